//! The operations of SPEC §4 and the URL patterns that name them.

/// An operation a client may be allowed (`allow.operations`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Images,
    Audio,
    ModelsRead,
    /// A WebSocket session (SPEC §12).
    Realtime,
    /// Uploads, lists, reads and deletes of files (SPEC §11).
    Files,
    /// Batch jobs (SPEC §11).
    Batches,
}

impl Operation {
    pub const ALL: [Operation; 10] = [
        Operation::ChatCompletions,
        Operation::Completions,
        Operation::Embeddings,
        Operation::Responses,
        Operation::Images,
        Operation::Audio,
        Operation::ModelsRead,
        Operation::Realtime,
        Operation::Files,
        Operation::Batches,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::ChatCompletions => "chat.completions",
            Operation::Completions => "completions",
            Operation::Embeddings => "embeddings",
            Operation::Responses => "responses",
            Operation::Images => "images",
            Operation::Audio => "audio",
            Operation::ModelsRead => "models.read",
            Operation::Realtime => "realtime",
            Operation::Files => "files",
            Operation::Batches => "batches",
        }
    }

    pub fn parse(s: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// Operations whose responses report token usage the gateway accounts for.
    pub fn counts_tokens(self) -> bool {
        matches!(
            self,
            Operation::ChatCompletions
                | Operation::Completions
                | Operation::Embeddings
                | Operation::Responses
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for op in Operation::ALL {
            assert_eq!(Operation::parse(op.as_str()), Some(op));
        }
        assert_eq!(Operation::parse("files"), Some(Operation::Files));
        assert_eq!(Operation::parse("fine_tuning"), None);
    }
}

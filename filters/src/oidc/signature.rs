//! Signature checks of tokens that are not in the cache, on threads of their own
//! (`identity.verify_threads`), so that a burst of new tokens — every client of a tenant
//! refreshing its token in the same minute — does not hold up the event loop that serves the
//! requests whose tokens are cached.
//!
//! An RSA-2048 verify is ~16 µs of CPU; on the event loop every request queued behind a miss
//! waits for it. Here a miss hands the key (shared, never copied), the signed bytes and the
//! signature to a pool thread and waits for the answer without blocking its thread. The
//! queue is bounded: when it is full the request waits for room (backpressure), it never
//! skips the check. With 0 threads the check runs on the event loop, as before.
//!
//! A check always has an answer: if the pool's threads are gone (they only end when the
//! verifier is dropped) or could not be started, the check runs where it was asked.

use std::sync::{Arc, Mutex, OnceLock};

use jsonwebtoken::Algorithm;
use tokio::sync::{mpsc, oneshot};

use super::keys::VerifyKey;

/// Default of `identity.verify_threads`.
pub const DEFAULT_VERIFY_THREADS: usize = 1;
/// Upper bound of `identity.verify_threads`.
pub const MAX_VERIFY_THREADS: usize = 64;
/// Checks waiting for a pool thread before a new one waits for room.
const QUEUE: usize = 1024;

/// One signature to check.
pub(crate) struct Job {
    key: Arc<VerifyKey>,
    alg: Algorithm,
    /// `header.payload` then the signature (base64url), in one allocation.
    token: Box<str>,
    signing_input_len: usize,
    answer: oneshot::Sender<bool>,
}

impl Job {
    fn run(self) {
        let (signing_input, signature) = self.token.split_at(self.signing_input_len);
        let ok = self
            .key
            .verify(self.alg, signing_input.as_bytes(), signature);
        // The asker may have gone (its client closed): nothing to tell then.
        let _ = self.answer.send(ok);
    }
}

/// Where signatures are checked: the asking task's thread, or a pool of threads.
pub(crate) enum Signatures {
    Inline,
    Pool(Pool),
}

/// The pool's threads start with the first check that needs them, in the process that
/// serves: threads started before `--daemon`'s fork would not exist in the child, and a
/// gateway whose tokens all hit the cache never starts them.
pub(crate) struct Pool {
    threads: usize,
    /// `None` inside: no thread could be started (checks then run in place).
    queue: OnceLock<Option<mpsc::Sender<Job>>>,
}

impl Pool {
    fn queue(&self) -> Option<&mpsc::Sender<Job>> {
        self.queue.get_or_init(|| start(self.threads)).as_ref()
    }
}

/// Starts `threads` pool threads (named `agw-jwt-verify`) on one queue.
fn start(threads: usize) -> Option<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>(QUEUE);
    let rx = Arc::new(Mutex::new(rx));
    let mut started = 0;
    for _ in 0..threads {
        let rx = rx.clone();
        match std::thread::Builder::new()
            .name("agw-jwt-verify".into())
            .spawn(move || serve(&rx))
        {
            Ok(_) => started += 1,
            Err(e) => log::warn!("identity.verify_threads: cannot start a thread: {e}"),
        }
    }
    if started == 0 {
        log::warn!(
            "identity.verify_threads: no thread started; signatures are checked on the event loop"
        );
        return None;
    }
    Some(tx)
}

impl Signatures {
    /// A pool of `threads` threads (started on first use), or [`Signatures::Inline`] for 0.
    pub(crate) fn new(threads: usize) -> Result<Self, String> {
        if threads == 0 {
            return Ok(Signatures::Inline);
        }
        if threads > MAX_VERIFY_THREADS {
            return Err(format!(
                "identity.verify_threads: {threads} is more than {MAX_VERIFY_THREADS}"
            ));
        }
        Ok(Signatures::Pool(Pool {
            threads,
            queue: OnceLock::new(),
        }))
    }

    /// Whether `signature` (base64url) is a valid `alg` signature of `signing_input` by `key`.
    pub(crate) async fn verify(
        &self,
        key: &Arc<VerifyKey>,
        alg: Algorithm,
        signing_input: &str,
        signature: &str,
    ) -> bool {
        let Some(tx) = (match self {
            Signatures::Inline => None,
            Signatures::Pool(pool) => pool.queue(),
        }) else {
            return key.verify(alg, signing_input.as_bytes(), signature);
        };
        let mut token = String::with_capacity(signing_input.len() + signature.len());
        token.push_str(signing_input);
        token.push_str(signature);
        let (answer, answered) = oneshot::channel();
        let job = Job {
            key: key.clone(),
            alg,
            token: token.into_boxed_str(),
            signing_input_len: signing_input.len(),
            answer,
        };
        if tx.send(job).await.is_ok() {
            if let Ok(ok) = answered.await {
                return ok;
            }
        }
        // No thread left to take it, or it ended without answering (it panicked): check here.
        key.verify(alg, signing_input.as_bytes(), signature)
    }
}

/// A pool thread: takes checks until every sender is gone. One thread at a time waits on
/// the queue (the lock is held only while waiting for the next job).
fn serve(rx: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        let job = rx
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .blocking_recv();
        match job {
            Some(job) => job.run(),
            None => return,
        }
    }
}

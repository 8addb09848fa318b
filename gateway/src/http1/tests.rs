use bytes::Bytes;

use super::head::Raw;
use super::*;
use tokio::io::duplex;
use tokio::io::AsyncWriteExt;

async fn conn_with(input: &'static [u8]) -> Conn<tokio::io::DuplexStream> {
    let (a, mut b) = duplex(1 << 20);
    b.write_all(input).await.unwrap();
    drop(b);
    Conn::new(a)
}

async fn body_of(c: &mut Conn<tokio::io::DuplexStream>, f: Framing) -> Result<Vec<u8>, H1Error> {
    let mut r = BodyReader::new(f);
    let mut out = Vec::new();
    while let Some(b) = r.next(c).await? {
        out.extend_from_slice(&b);
    }
    Ok(out)
}

#[tokio::test]
async fn parses_a_request_and_keeps_the_pipelined_rest() {
    let mut c = conn_with(
        b"POST /openai/deployments/x/chat/completions?api-version=1 HTTP/1.1\r\nHost: a\r\nAPI-Key: k\r\nContent-Length: 2\r\n\r\n{}GET /healthz HTTP/1.1\r\n\r\n",
    )
    .await;
    let h = c.read_head(false).await.unwrap().unwrap();
    assert_eq!(h.method(), "POST");
    assert_eq!(h.path(), "/openai/deployments/x/chat/completions");
    assert_eq!(h.query(), Some("api-version=1"));
    assert_eq!(h.get("api-key"), Some(&b"k"[..]));
    assert_eq!(h.get_str("HOST"), Some("a"));
    assert!(h.keep_alive());
    assert_eq!(h.request_framing().unwrap(), Framing::Length(2));
    assert_eq!(body_of(&mut c, Framing::Length(2)).await.unwrap(), b"{}");
    let h2 = c.read_head(false).await.unwrap().unwrap();
    assert_eq!((h2.method(), h2.path()), ("GET", "/healthz"));
    assert!(c.read_head(false).await.unwrap().is_none(), "clean close");
}

/// Every header name the codec knows by its literal (`Name::known`).
const LITERALS: &[(&str, Name)] = &[
    ("te", Name::Te),
    ("host", Name::Host),
    ("cookie", Name::Cookie),
    ("expect", Name::Expect),
    ("api-key", Name::ApiKey),
    ("trailer", Name::Trailer),
    ("upgrade", Name::Upgrade),
    ("connection", Name::Connection),
    ("keep-alive", Name::KeepAlive),
    ("set-cookie", Name::SetCookie),
    ("retry-after", Name::RetryAfter),
    ("content-type", Name::ContentType),
    ("x-request-id", Name::XRequestId),
    ("x-azure-fdid", Name::XAzureFdid),
    ("authorization", Name::Authorization),
    ("content-length", Name::ContentLength),
    ("retry-after-ms", Name::RetryAfterMs),
    ("apim-request-id", Name::ApimRequestId),
    ("accept-encoding", Name::AcceptEncoding),
    ("x-forwarded-for", Name::XForwardedFor),
    ("proxy-connection", Name::ProxyConnection),
    ("x-azure-clientip", Name::XAzureClientIp),
    ("transfer-encoding", Name::TransferEncoding),
    ("proxy-authorization", Name::ProxyAuthorization),
    ("http2-settings", Name::Http2Settings),
];

#[test]
fn header_names_are_recognized_in_any_case_and_only_exactly() {
    let known = LITERALS
        .iter()
        .copied()
        .chain([("x-ratelimit-remaining-tokens", Name::RateLimit)]);
    for (lit, name) in known {
        assert_eq!(Name::of(lit.as_bytes()), name, "{lit}");
        assert_eq!(Name::of(lit.to_uppercase().as_bytes()), name, "{lit}");
        // One character off, or one longer: not that header.
        for at in [0, lit.len() / 2, lit.len() - 1] {
            if name == Name::RateLimit && at >= 12 {
                continue;
            }
            let mut off = lit.as_bytes().to_vec();
            off[at] = b'!';
            assert_eq!(Name::of(&off), Name::Other, "{lit} changed at {at}");
        }
        if name != Name::RateLimit {
            assert_eq!(
                Name::of(format!("{lit}x").as_bytes()),
                Name::Other,
                "{lit}x"
            );
        }
    }
    for other in [
        "x-ratelimit-",
        "content_length",
        "api_key",
        "hostx",
        "",
        "x",
    ] {
        assert_eq!(Name::of(other.as_bytes()), Name::Other, "{other}");
    }
    assert!(Name::ApiKey.never_upstream() && !Name::ApiKey.never_downstream());
    assert!(Name::SetCookie.never_downstream() && !Name::SetCookie.never_upstream());
    assert!(Name::Connection.never_upstream() && Name::Connection.never_downstream());
    assert!(!Name::ContentType.never_upstream() && !Name::Other.never_downstream());
}

#[test]
fn request_targets_split_into_path_and_query() {
    for (target, path, query) in [
        ("/a/b?x=1&y", "/a/b", Some("x=1&y")),
        ("/a/b", "/a/b", None),
        ("/a?", "/a", Some("")),
        ("http://host/a/b?x=1", "/a/b", Some("x=1")),
        ("HTTPS://host:443/a", "/a", None),
        ("http://host", "/", None),
        ("http://host?x=1", "/", Some("x=1")),
        ("http://host?", "/", Some("")),
        ("http://host#x/openai/models", "/", None),
        ("http://host/a#x", "/a#x", None),
        ("*", "*", None),
    ] {
        let h = Head::request("GET", target, []);
        assert_eq!(h.path(), path, "{target}");
        assert_eq!(h.path_text().as_str(), path, "{target}");
        assert_eq!(h.query(), query, "{target}");
    }
}

#[test]
fn lookups_find_the_first_of_repeated_headers_and_framing_sees_all() {
    let h = Head::request(
        "POST",
        "/",
        [
            ("X-Custom", &b"1"[..]),
            ("Content-Length", b"5"),
            ("content-length", b"6"),
            ("x-custom", b"2"),
        ],
    );
    assert_eq!(h.get("content-length"), Some(&b"5"[..]));
    assert_eq!(h.get("x-custom"), Some(&b"1"[..]));
    assert!(h.get("api-key").is_none());
    assert!(matches!(
        h.request_framing(),
        Err(H1Error::Malformed("conflicting Content-Length"))
    ));
    let t = h.get_text("content-length").unwrap();
    assert_eq!(t.as_str(), "5");
}

#[test]
fn the_method_as_text_is_the_method_whether_it_is_a_usual_one_or_not() {
    for m in [
        "POST", "GET", "DELETE", "PUT", "HEAD", "OPTIONS", "PATCH", "post", "GETS", "POS", "X",
    ] {
        let h = Head::request(m, "/p", []);
        assert_eq!(h.method_text().as_str(), m);
        assert_eq!(h.method_text().as_str(), h.method());
    }
}

#[test]
fn text_parts_of_heads_with_and_without_bytes_above_ascii() {
    // A UTF-8 head: its parts are borrowed from the one check of the whole head.
    let h = Head::request(
        "POST",
        "/caf\u{e9}?q=\u{e9}",
        [("x-name", "J\u{f6}rg".as_bytes()), ("api-key", b"k")],
    );
    assert!(matches!(h.raw, Raw::Text(_)));
    assert_eq!(
        (h.method(), h.path(), h.query()),
        ("POST", "/caf\u{e9}", Some("q=\u{e9}"))
    );
    assert_eq!(h.method_text().as_str(), "POST");
    assert_eq!(h.path_text().as_str(), "/caf\u{e9}");
    assert_eq!(h.get_str("x-name"), Some("J\u{f6}rg"));
    assert_eq!(h.get_text("x-name").unwrap().as_str(), "J\u{f6}rg");
    // One header value that is not UTF-8 (obs-text): only that one has no text.
    let h = Head::request(
        "GET",
        "/p",
        [("x-latin1", &b"J\xf6rg"[..]), ("api-key", b"k")],
    );
    assert!(matches!(h.raw, Raw::Bytes(_)));
    assert_eq!((h.method(), h.path()), ("GET", "/p"));
    assert_eq!(h.path_text().as_str(), "/p");
    assert_eq!(h.get_str("x-latin1"), None);
    assert!(h.get_text("x-latin1").is_none());
    assert_eq!(h.get("x-latin1"), Some(&b"J\xf6rg"[..]));
    assert_eq!(h.get_str(Name::ApiKey), Some("k"));
}

#[tokio::test]
async fn response_heads_give_their_header_values_as_text() {
    let mut c =
        conn_with(b"HTTP/1.1 200 OK\r\napim-request-id: abc-1\r\nx-bad: \xff\r\n\r\n").await;
    let h = c.read_head(true).await.unwrap().unwrap();
    assert_eq!(h.get_text(Name::ApimRequestId).unwrap().as_str(), "abc-1");
    assert!(h.get_text("x-bad").is_none());
}

#[tokio::test]
async fn decodes_chunked_bodies_with_extensions_and_trailers() {
    let mut c = conn_with(b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nx-t: 1\r\n\r\nNEXT").await;
    assert_eq!(
        body_of(&mut c, Framing::Chunked).await.unwrap(),
        b"Wikipedia"
    );
    assert_eq!(&c.rbuf[..], b"NEXT");
}

#[tokio::test]
async fn truncated_bodies_are_errors_not_short_bodies() {
    let mut c = conn_with(b"abc").await;
    assert!(matches!(
        body_of(&mut c, Framing::Length(5)).await,
        Err(H1Error::Closed)
    ));
    let mut c = conn_with(b"5\r\nab").await;
    assert!(matches!(
        body_of(&mut c, Framing::Chunked).await,
        Err(H1Error::Closed)
    ));
    let mut c = conn_with(b"2\r\nabXY0\r\n\r\n").await;
    assert!(matches!(
        body_of(&mut c, Framing::Chunked).await,
        Err(H1Error::Malformed(_))
    ));
    let mut c = conn_with(b"zz\r\n").await;
    assert!(matches!(
        body_of(&mut c, Framing::Chunked).await,
        Err(H1Error::Malformed(_))
    ));
}

#[test]
fn collected_keeps_one_piece_and_joins_several() {
    let one = Bytes::from_static(b"whole");
    let mut c = Collected::default();
    c.push(one.clone(), 5);
    assert_eq!(c.len(), 5);
    let got = c.freeze();
    assert_eq!(got, one);
    assert_eq!(got.as_ptr(), one.as_ptr(), "a single piece is not copied");
    let mut c = Collected::default();
    for p in [&b"ab"[..], b"", b"cd", b"e"] {
        c.push(Bytes::copy_from_slice(p), 0);
    }
    assert_eq!((c.len(), &c.freeze()[..]), (5, &b"abcde"[..]));
    assert_eq!(Collected::default().freeze().len(), 0);
}

#[tokio::test]
async fn close_delimited_bodies_end_at_eof() {
    let mut c = conn_with(b"data: 1\n\ndata: 2\n\n").await;
    assert_eq!(
        body_of(&mut c, Framing::Close).await.unwrap(),
        b"data: 1\n\ndata: 2\n\n"
    );
}

#[tokio::test]
async fn smuggling_shapes_are_refused() {
    for raw in [
        &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
    ] {
        let raw: &'static [u8] = Box::leak(raw.to_vec().into_boxed_slice());
        let mut c = conn_with(raw).await;
        let h = c.read_head(false).await.unwrap().unwrap();
        assert!(
            matches!(h.request_framing(), Err(H1Error::Malformed(_))),
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
    // The same length twice is one length.
    let mut c =
        conn_with(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n").await;
    let h = c.read_head(false).await.unwrap().unwrap();
    assert_eq!(h.request_framing().unwrap(), Framing::Length(3));
}

#[tokio::test]
async fn garbage_oversized_and_truncated_heads() {
    let mut c = conn_with(b"\x16\x03\x01 not http\r\n\r\n").await;
    assert!(matches!(
        c.read_head(false).await,
        Err(H1Error::Malformed(_))
    ));
    let big: &'static [u8] = Box::leak(
        format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(MAX_HEAD))
            .into_bytes()
            .into_boxed_slice(),
    );
    let mut c = conn_with(big).await;
    assert!(matches!(
        c.read_head(false).await,
        Err(H1Error::HeadTooLarge)
    ));
    let mut c = conn_with(b"GET / HTTP/1.1\r\nHost: a\r\n").await;
    assert!(matches!(c.read_head(false).await, Err(H1Error::Closed)));
}

#[tokio::test]
async fn response_framing_and_keep_alive() {
    let mut c = conn_with(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n").await;
    let h = c.read_head(true).await.unwrap().unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(h.response_framing(false).unwrap(), Framing::Close);
    let mut c = conn_with(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n").await;
    let h = c.read_head(true).await.unwrap().unwrap();
    assert_eq!(h.response_framing(false).unwrap(), Framing::Length(0));
    let mut c = conn_with(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n").await;
    let h = c.read_head(true).await.unwrap().unwrap();
    assert!(!h.keep_alive());
    let mut c = conn_with(b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\n\r\n").await;
    assert!(!c.read_head(true).await.unwrap().unwrap().keep_alive());
    let h = Head::request("GET", "http://gw.example/healthz?x=1", []);
    assert_eq!((h.path(), h.query()), ("/healthz", Some("x=1")));
}

#[test]
fn response_heads_encode_with_their_framing() {
    let fields = b"retry-after: 3\r\nx-n: 42\r\n";
    let mut out = Vec::new();
    encode_head(429, fields, &mut out, OutFraming::Length(2), true);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "HTTP/1.1 429 Too Many Requests\r\nretry-after: 3\r\nx-n: 42\r\ncontent-length: 2\r\nconnection: close\r\n\r\n"
    );
    let mut out = Vec::new();
    encode_head(200, b"", &mut out, OutFraming::Chunked, false);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    let mut out = Vec::new();
    encode_chunk(&mut out, &[b'x'; 26]);
    assert!(out.starts_with(b"1a\r\nxxx"));
    assert!(out.ends_with(b"x\r\n"));
}

/// Every status, framing and close: the head as it was written piece by piece (the oracle).
#[test]
fn response_heads_are_the_bytes_written_piece_by_piece() {
    fn by_pieces(status: u16, lines: &[u8], framing: OutFraming, close: bool) -> Vec<u8> {
        let mut out = b"HTTP/1.1 ".to_vec();
        out.extend_from_slice(status.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(reason(status).as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(lines);
        match framing {
            OutFraming::Length(n) => {
                out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes())
            }
            OutFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            OutFraming::Close | OutFraming::None => {}
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
    for status in (100..1000u16).filter(|s| s % 7 == 0 || [200, 204, 304, 429, 999].contains(s)) {
        for lines in [&b""[..], b"a: b\r\n", b"x-request-id: 1\r\nc: d\r\n"] {
            for framing in [
                OutFraming::Length(0),
                OutFraming::Length(327),
                OutFraming::Length(usize::MAX),
                OutFraming::Chunked,
                OutFraming::Close,
                OutFraming::None,
            ] {
                for close in [false, true] {
                    let mut out = b"prefix".to_vec();
                    encode_head(status, lines, &mut out, framing, close);
                    let want = [&b"prefix"[..], &by_pieces(status, lines, framing, close)].concat();
                    assert_eq!(out, want, "{status} {framing:?} {close}");
                }
            }
        }
    }
}

#[tokio::test]
async fn strict_chunk_lines_and_trailers_refuse_what_could_be_read_two_ways() {
    for raw in [
        // A bare LF in a chunk extension ("TERM.EXT"): the rest must not become a request.
        &b"2;\nxx\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n"[..],
        b"\r\n2\r\nxx\r\n0\r\n\r\n",
        b"2\r\nxx\r\n0\r\nno colon here\r\n\r\n",
        b"2\r\nxx\r\n0\r\nx-t : 1\r\n\r\n",
        b"2\r\nxx\r\n0\r\nx-t: 1\nGET / HTTP/1.1\r\n\r\n",
        b"2\r\nxx\r\n0\n\r\n",
    ] {
        let raw: &'static [u8] = Box::leak(raw.to_vec().into_boxed_slice());
        let mut c = conn_with(raw).await;
        assert!(
            matches!(
                body_of(&mut c, Framing::Chunked).await,
                Err(H1Error::Malformed(_))
            ),
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
}

#[tokio::test]
async fn chunk_extension_and_trailer_budgets_are_per_message() {
    use super::framing::{MAX_CHUNK_EXTENSIONS, MAX_TRAILER_LINES};
    // Many small chunks, each with an extension well under the line limit: the message's
    // total is what is bounded.
    let ext = "a".repeat(1000);
    let n = MAX_CHUNK_EXTENSIONS / 1000 + 1;
    let mut raw = String::new();
    for _ in 0..n {
        raw.push_str(&format!("1;{ext}\r\nx\r\n"));
    }
    raw.push_str("0\r\n\r\n");
    let raw: &'static [u8] = Box::leak(raw.into_bytes().into_boxed_slice());
    let mut c = conn_with(raw).await;
    assert!(matches!(
        body_of(&mut c, Framing::Chunked).await,
        Err(H1Error::Malformed("too many chunk extension bytes"))
    ));
    let mut raw = String::from("0\r\n");
    for i in 0..=MAX_TRAILER_LINES {
        raw.push_str(&format!("x-t{i}: 1\r\n"));
    }
    raw.push_str("\r\n");
    let raw: &'static [u8] = Box::leak(raw.into_bytes().into_boxed_slice());
    let mut c = conn_with(raw).await;
    assert!(matches!(
        body_of(&mut c, Framing::Chunked).await,
        Err(H1Error::Malformed("trailer section too large"))
    ));
    // Within the budgets: read, trailers dropped, the next message left in place.
    let mut c = conn_with(b"4;a=1;b=\"x y\"\r\nWiki\r\n0\r\nx-a: 1\r\nx-b: 2\r\n\r\nNEXT").await;
    assert_eq!(body_of(&mut c, Framing::Chunked).await.unwrap(), b"Wiki");
    assert_eq!(&c.rbuf[..], b"NEXT");
}

#[tokio::test]
async fn a_head_that_trickles_in_times_out_from_its_first_byte() {
    let (a, mut b) = duplex(1 << 16);
    let mut c = Conn::new(a);
    c.set_head_timeout(std::time::Duration::from_millis(200));
    let writer = tokio::spawn(async move {
        for &byte in b"GET / HTTP/1.1\r\nHost: a\r\n" {
            b.write_all(&[byte]).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        }
        b
    });
    let started = std::time::Instant::now();
    assert!(matches!(
        c.read_head(false).await,
        Err(H1Error::HeadTimeout)
    ));
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(2), "{took:?}");
    drop(writer);
    // A head that arrives whole is not timed at all, however long the connection was idle.
    let (a, mut b) = duplex(1 << 16);
    let mut c = Conn::new(a);
    c.set_head_timeout(std::time::Duration::from_millis(100));
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    b.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(c.read_head(false).await.unwrap().is_some());
}

#[test]
fn http10_requests_with_a_transfer_encoding_are_refused() {
    let h = Head::request("POST", "/", [("transfer-encoding", &b"chunked"[..])]);
    assert_eq!(h.request_framing().unwrap(), Framing::Chunked);
    let mut h = h;
    h.minor = 0;
    assert!(matches!(h.request_framing(), Err(H1Error::Malformed(_))));
}

#[test]
fn connection_nominated_fields_do_not_cross() {
    let h = Head::request(
        "POST",
        "/",
        [
            ("Connection", &b"keep-alive, X-Hop"[..]),
            ("X-Hop", b"secret"),
            ("x-custom", b"1"),
            ("Transfer_Encoding", b"chunked"),
            ("HTTP2-Settings", b"AAAA"),
            ("Sec-WebSocket-Key", b"k"),
            ("content-type", b"application/json"),
        ],
    );
    let names: Vec<_> = h
        .end_to_end_fields(super::framing::forward_upstream)
        .map(|(_, n, _)| String::from_utf8_lossy(n).into_owned())
        .collect();
    assert_eq!(names, ["x-custom", "content-type"]);
}

#[tokio::test]
async fn keep_alive_is_decided_by_version_and_connection_close_wins() {
    for (minor, connection, keep) in [
        (1, None, true),
        (1, Some("keep-alive"), true),
        (1, Some("close"), false),
        (1, Some("Keep-Alive, Close"), false),
        (0, None, false),
        (0, Some("keep-alive"), true),
        (0, Some("keep-alive, close"), false),
        (0, Some("close, Keep-Alive"), false),
    ] {
        let raw = format!(
            "HTTP/1.{minor} 200 OK\r\n{}Content-Length: 0\r\n\r\n",
            connection.map_or(String::new(), |c| format!("Connection: {c}\r\n"))
        );
        let (a, mut b) = duplex(1 << 16);
        b.write_all(raw.as_bytes()).await.unwrap();
        drop(b);
        let h = Conn::new(a).read_head(true).await.unwrap().unwrap();
        assert_eq!(h.keep_alive(), keep, "HTTP/1.{minor} {connection:?}");
    }
    // HTTP/1.0: a Connection field with bytes beyond visible ASCII grants no keep-alive.
    let mut c = conn_with(b"GET / HTTP/1.0\r\nConnection: keep-alive, x\xff\r\n\r\n").await;
    assert!(!c.read_head(false).await.unwrap().unwrap().keep_alive());
}

#[tokio::test]
async fn a_status_below_100_is_refused() {
    for raw in [&b"HTTP/1.1 000 X\r\n\r\n"[..], b"HTTP/1.1 099 X\r\n\r\n"] {
        let mut c = conn_with(raw).await;
        assert!(
            matches!(c.read_head(true).await, Err(H1Error::Malformed(_))),
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
}

#[test]
fn read_room_is_small_unless_reads_fill_it() {
    use super::conn::{bulk_after, prep_read, prep_read_with, Prep};
    // A connection's first read: a small buffer.
    assert_eq!(prep_read(0, 0, 0, false), Prep::Room(READ_SMALL));
    // Room enough: read into it, with or without bytes buffered.
    assert_eq!(
        prep_read(0, READ_SMALL - 300, READ_SMALL, false),
        Prep::Keep
    );
    assert_eq!(prep_read(500, READ_MIN_FREE, READ_SMALL, false), Prep::Keep);
    // Too little room: made (the allocation reclaimed, or a new one), small, or large after
    // a read that filled its room.
    assert_eq!(
        prep_read(0, READ_MIN_FREE - 1, READ_SMALL, false),
        Prep::Room(READ_SMALL)
    );
    assert_eq!(
        prep_read(3000, 100, READ_SMALL, true),
        Prep::Room(READ_CHUNK)
    );
    // A large allocation with nothing buffered while reads are small: a small new one ...
    assert_eq!(
        prep_read(0, READ_CHUNK - 300, READ_CHUNK, false),
        Prep::Shrink(READ_SMALL)
    );
    assert_eq!(prep_read(0, 0, 40_000, true), Prep::Shrink(READ_CHUNK));
    // ... but not while reads fill their room, and never with bytes buffered.
    assert_eq!(prep_read(0, READ_CHUNK - 300, READ_CHUNK, true), Prep::Keep);
    assert_eq!(
        prep_read(1, READ_CHUNK - 300, READ_CHUNK, false),
        Prep::Keep
    );
    assert_eq!(prep_read(1, 10, READ_CHUNK, false), Prep::Room(READ_SMALL));
    // Bulk: a read that fills its room starts it; a small one ends it.
    // An SSE stream's backend reads: a 4 KiB buffer with nothing in it becomes 2 KiB, which
    // is then kept and made room in; a read that fills it goes to bulk reads as before.
    let stream = super::READ_STREAM;
    assert_eq!(
        prep_read_with(0, READ_SMALL - 300, READ_SMALL, false, stream),
        Prep::Shrink(stream)
    );
    assert_eq!(prep_read_with(200, 1500, stream, false, stream), Prep::Keep);
    assert_eq!(
        prep_read_with(0, READ_MIN_FREE - 1, stream, false, stream),
        Prep::Room(stream)
    );
    assert_eq!(
        prep_read_with(0, 0, stream, true, stream),
        Prep::Room(READ_CHUNK)
    );
    assert!(bulk_after(READ_SMALL, READ_SMALL, false));
    assert!(!bulk_after(READ_SMALL - 1, READ_SMALL, false));
    assert!(bulk_after(READ_CHUNK - 10, READ_CHUNK, true));
    assert!(!bulk_after(READ_SMALL - 1, READ_CHUNK, true));
    assert!(!bulk_after(0, READ_CHUNK, true));
}

/// A backend's chunked stream: a large chunk read in large reads, then small events that
/// trickle in, as an SSE stream does — which leaves the connection with a small buffer.
#[tokio::test]
async fn a_trickling_stream_after_a_large_body_holds_a_small_read_buffer() {
    let (a, mut b) = duplex(1 << 20);
    let mut c = Conn::new(a);
    let big = vec![b'x'; 100 * 1024];
    b.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    b.write_all(format!("{:x}\r\n", big.len()).as_bytes())
        .await
        .unwrap();
    b.write_all(&big).await.unwrap();
    let h = c.read_head(true).await.unwrap().unwrap();
    assert_eq!(h.status, 200);
    assert!(c.allocated() <= READ_SMALL, "a head: {}", c.allocated());
    let mut r = BodyReader::new(Framing::Chunked);
    let (mut got, mut largest) = (0, 0);
    while got < big.len() {
        let piece = r.next(&mut c).await.unwrap().unwrap();
        got += piece.len();
        largest = largest.max(piece.len());
    }
    assert_eq!(got, big.len());
    assert!(largest > READ_SMALL, "bulk reads get large room: {largest}");
    assert!(c.allocated() > READ_SMALL);
    drop(h);
    for i in 0..20 {
        let event = format!("data: {{\"n\":{i}}}\n\n");
        let end = if i == 0 { "\r\n" } else { "" };
        b.write_all(format!("{end}{:x}\r\n{event}\r\n", event.len()).as_bytes())
            .await
            .unwrap();
        let piece = r.next(&mut c).await.unwrap().unwrap();
        assert_eq!(&piece[..], event.as_bytes());
        // The first small read ends the bulk; from the next one on, the buffer is small.
        assert!(
            i == 0 || c.allocated() <= READ_SMALL,
            "event {i}: a waiting stream holds {} bytes",
            c.allocated()
        );
    }
    b.write_all(b"0\r\n\r\n").await.unwrap();
    assert!(r.next(&mut c).await.unwrap().is_none());
}

/// Many small messages on one connection reuse one small allocation (reclaimed once the
/// pieces split from it are gone), never growing it.
#[tokio::test]
async fn keep_alive_requests_reuse_one_small_read_buffer() {
    let (a, mut b) = duplex(1 << 20);
    let mut c = Conn::new(a);
    for i in 0..200 {
        b.write_all(b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\n{}")
            .await
            .unwrap();
        let h = c.read_head(false).await.unwrap().unwrap();
        assert_eq!(body_of(&mut c, Framing::Length(2)).await.unwrap(), b"{}");
        drop(h);
        assert_eq!(c.allocated(), READ_SMALL, "request {i}");
    }
}

#[test]
fn known_names_are_their_literals_with_letters_in_either_case_and_nothing_else() {
    for &(lit, kind) in LITERALS {
        let lit = lit.as_bytes();
        assert_eq!(Name::known(lit), Some(kind));
        assert_eq!(Name::known(&lit.to_ascii_uppercase()), Some(kind));
        assert_eq!(Name::of(lit), kind);
        // Every byte value at every position: a letter's other case passes, nothing else.
        for at in 0..lit.len() {
            for c in 0..=255u8 {
                let mut m = lit.to_vec();
                m[at] = c;
                let l = lit[at];
                let same = c == l || (l.is_ascii_lowercase() && c == l.to_ascii_uppercase());
                assert_eq!(Name::known(&m), same.then_some(kind), "{m:?}");
                if same {
                    assert_eq!(Name::of(&m), kind);
                }
            }
        }
        // Longer or shorter by a byte: not the literal.
        assert_eq!(Name::known(&lit[1..]), None);
        assert_eq!(Name::known(&[lit, b"x"].concat()), None);
    }
    for other in [
        &b"x-ratelimit-remaining-requests"[..],
        b"sec-websocket-key",
        b"server",
        b"",
    ] {
        assert_eq!(Name::known(other), None);
    }
}

/// The field lines written from a head: received runs copied as they are, and every other
/// field written `name: value\r\n`, are the bytes of the fields written one by one, for
/// every spacing around the values, the line ends `httparse` also reads, fields dropped in
/// between, names the `Connection` field nominates, and heads made from parts.
#[tokio::test]
async fn end_to_end_lines_are_the_fields_written_one_by_one() {
    fn one_by_one(h: &Head, keep: impl Fn(Name, &[u8]) -> bool) -> Vec<u8> {
        let mut out = Vec::new();
        for (_, name, value) in h.end_to_end_fields(keep) {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out
    }
    fn check(h: &Head) -> usize {
        type Keep<'a> = &'a dyn Fn(Name, &[u8]) -> bool;
        let keeps: [Keep<'_>; 4] = [
            &super::framing::forward_upstream,
            &|k, _| super::framing::forward_downstream(k),
            &|_, _| true,
            &|k, _| k != Name::Other,
        ];
        let mut copied = 0;
        for keep in keeps {
            let mut out = b"x".to_vec();
            h.write_end_to_end_fields(keep, &mut out);
            let want = [&b"x"[..], &one_by_one(h, keep)].concat();
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&want),
                "{:?}",
                h.fields().collect::<Vec<_>>()
            );
            copied += usize::from(out.len() > 1);
        }
        copied
    }
    async fn parsed(raw: Vec<u8>, response: bool) -> Head {
        let (a, mut b) = duplex(1 << 16);
        b.write_all(&raw).await.unwrap();
        drop(b);
        Conn::new(a).read_head(response).await.unwrap().unwrap()
    }
    let separators: [&[u8]; 4] = [b":", b": ", b":  ", b":\t"];
    let trailing: [&[u8]; 3] = [b"", b" ", b"\t"];
    let values: [&[u8]; 3] = [b"1", b"", b"a \xff b"];
    let mut written = 0;
    for (i, names) in [
        ["X-A", "Cookie", "X-B"],
        ["Content-Type", "X-Hop", "x-request-id"],
        ["x_under", "X-A", "Content-Length"],
    ]
    .iter()
    .enumerate()
    {
        for sep in separators {
            for trail in trailing {
                for value in values {
                    for at in 0..3 {
                        let mut fields = Vec::new();
                        if i == 1 {
                            fields.extend_from_slice(b"Connection: keep-alive, X-Hop\r\n");
                        }
                        for (k, name) in names.iter().enumerate() {
                            fields.extend_from_slice(name.as_bytes());
                            if k == at {
                                fields.extend_from_slice(sep);
                                fields.extend_from_slice(value);
                                fields.extend_from_slice(trail);
                            } else {
                                fields.extend_from_slice(b": v");
                            }
                            fields.extend_from_slice(b"\r\n");
                        }
                        let request = [&b"POST /x HTTP/1.1\r\n"[..], &fields, b"\r\n"].concat();
                        written += check(&parsed(request, false).await);
                        let response = [&b"HTTP/1.1 200 OK\r\n"[..], &fields, b"\r\n"].concat();
                        written += check(&parsed(response, true).await);
                        // Bare LF line ends (read by `httparse`): written field by field.
                        let bare: Vec<u8> = [&b"HTTP/1.1 200 OK\r\n"[..], &fields, b"\r\n"]
                            .concat()
                            .iter()
                            .copied()
                            .filter(|&c| c != b'\r')
                            .collect();
                        written += check(&parsed(bare, true).await);
                    }
                }
            }
        }
    }
    assert!(written > 1000, "{written}");
    check(&Head::request(
        "GET",
        "/",
        [("X-A", &b": b\r\n"[..]), ("x-b", b"2"), ("Cookie", b"c")],
    ));
}

//! The stdio framing in front of the MCP SDK: newline-delimited JSON-RPC messages, each read
//! with a size bound. A line that is not JSON gets a `-32700` parse error, one that is not a
//! JSON-RPC 2.0 message a `-32600` invalid request, and one larger than [`MAX_MESSAGE`] a
//! `-32600` at once (the rest of it is read and dropped, never held), as JSON-RPC says; the
//! caller never waits forever on a message the server cannot take. Valid messages pass through
//! to the SDK unchanged, and its replies and our errors reach stdout whole, one line each.

use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, DuplexStream};
use tokio::sync::mpsc;

/// The largest message taken: tool arguments are small; a build's whole reply is bounded by
/// NATS' max payload.
pub(super) const MAX_MESSAGE: usize = 4 << 20;

/// What one line of input is.
#[derive(Debug, PartialEq)]
enum Line {
    Message(Vec<u8>),
    /// An error response to send back instead.
    Error(Value),
    Blank,
}

fn error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

/// Classifies a complete line (without its newline).
fn classify(line: &[u8]) -> Line {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Line::Blank;
    }
    let value: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return Line::Error(error(Value::Null, -32700, &format!("parse error: {e}"))),
    };
    let id = value.get("id").cloned().unwrap_or(Value::Null);
    let valid = value.as_object().is_some_and(|m| {
        m.get("jsonrpc").and_then(Value::as_str) == Some("2.0")
            && (m.get("method").is_some_and(Value::is_string) || m.contains_key("result") || m.contains_key("error"))
    });
    if !valid {
        let why = if value.is_array() { "batches are not supported" } else { "not a JSON-RPC 2.0 message" };
        return Line::Error(error(id, -32600, &format!("invalid request: {why}")));
    }
    Line::Message(line.to_vec())
}

/// Reads one line of at most [`MAX_MESSAGE`] bytes; a longer one is read to its end and
/// dropped. `None` at the end of input.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Option<Line>> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok((!line.is_empty() || too_long).then(|| finish(&line, too_long)));
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let piece = &buf[..if done { take - 1 } else { take }];
        if !too_long && line.len() + piece.len() > MAX_MESSAGE {
            too_long = true;
            line = Vec::new();
        }
        if !too_long {
            line.extend_from_slice(piece);
        }
        r.consume(take);
        if done {
            return Ok(Some(finish(&line, too_long)));
        }
    }
}

fn finish(line: &[u8], too_long: bool) -> Line {
    if too_long {
        return Line::Error(error(Value::Null, -32600, &format!("invalid request: larger than {MAX_MESSAGE} bytes")));
    }
    classify(line)
}

/// Serves `input` and `output` (stdin and stdout) to an SDK that reads and writes the two
/// returned streams; returns when the input ends and everything written is flushed.
pub(super) fn frame<I, O>(input: I, output: O) -> (DuplexStream, DuplexStream, tokio::task::JoinHandle<()>)
where
    I: AsyncRead + Unpin + Send + 'static,
    O: AsyncWrite + Unpin + Send + 'static,
{
    let (mut to_sdk, sdk_in) = tokio::io::duplex(1 << 16);
    let (sdk_out, from_sdk) = tokio::io::duplex(1 << 16);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
    let errors = tx.clone();
    let reader = async move {
        let mut input = BufReader::new(input);
        while let Ok(Some(line)) = read_line(&mut input).await {
            match line {
                Line::Message(mut m) => {
                    m.push(b'\n');
                    if to_sdk.write_all(&m).await.is_err() {
                        break;
                    }
                }
                Line::Error(e) => {
                    tracing::debug!(error = %e, "refused a malformed MCP message");
                    let mut text = e.to_string().into_bytes();
                    text.push(b'\n');
                    if errors.send(text).await.is_err() {
                        break;
                    }
                }
                Line::Blank => {}
            }
        }
        // The end of input is the SDK's end of input.
        let _ = to_sdk.shutdown().await;
    };
    let replies = async move {
        let mut lines = BufReader::new(from_sdk);
        loop {
            let mut line = Vec::new();
            match lines.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if tx.send(line).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        let mut output = output;
        while let Some(line) = rx.recv().await {
            if output.write_all(&line).await.is_err() || output.flush().await.is_err() {
                break;
            }
        }
    };
    let task = tokio::spawn(async move {
        let reading = tokio::spawn(reader);
        tokio::join!(replies, writer);
        reading.abort();
    });
    (sdk_in, sdk_out, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_messages_or_the_errors_json_rpc_names() {
        let code = |l: &str| match classify(l.as_bytes()) {
            Line::Error(e) => e["error"]["code"].as_i64(),
            Line::Message(_) => Some(0),
            Line::Blank => None,
        };
        assert_eq!(code(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#), Some(0));
        assert_eq!(code(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#), Some(0));
        assert_eq!(code(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#), Some(0));
        assert_eq!(code("not json"), Some(-32700));
        assert_eq!(code(r#"{"jsonrpc":"2.0","id":1"#), Some(-32700));
        assert_eq!(code(r#"{"id":7,"method":"ping"}"#), Some(-32600));
        assert_eq!(code(r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#), Some(-32600));
        assert_eq!(code("42"), Some(-32600));
        assert_eq!(code("   "), None);
        // The id of an invalid request is echoed where there is one.
        let Line::Error(e) = classify(br#"{"id":7,"method":"ping"}"#) else { panic!() };
        assert_eq!(e["id"], 7);
    }

    #[tokio::test]
    async fn an_oversized_line_is_refused_without_being_held() {
        let mut input = format!("{}\n", "x".repeat(MAX_MESSAGE + 10)).into_bytes();
        input.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"ping\"}\n");
        let mut r = BufReader::new(&input[..]);
        let Some(Line::Error(e)) = read_line(&mut r).await.unwrap() else { panic!("not refused") };
        assert_eq!(e["error"]["code"], -32600);
        assert!(matches!(read_line(&mut r).await.unwrap(), Some(Line::Message(_))));
        assert_eq!(read_line(&mut r).await.unwrap(), None);
    }
}

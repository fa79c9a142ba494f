//! Loopback helpers the tests and benchmarks of every crate share: a free port, and the
//! status and body of a plain HTTP/1.0 response, and a request that returns them.

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The status code and body of a whole HTTP/1.0 response, or `None` if it is not one.
pub fn parse_response(response: &str) -> Option<(u16, String)> {
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// One HTTP/1.0 request to 127.0.0.1:`port` with an optional `(content type, body)`: the
/// status and the body, or `None` when nothing answers.
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<(&str, &str)>,
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n");
    if let Some((content_type, body)) = body {
        head.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.ok()?;
    if let Some((_, body)) = body {
        stream.write_all(body.as_bytes()).await.ok()?;
    }
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    parse_response(&String::from_utf8_lossy(&response))
}

/// A server process of the tests on a loopback port, killed when dropped.
pub struct LoopbackServer {
    child: std::process::Child,
    port: u16,
}

impl LoopbackServer {
    /// Spawns `command` (already told to listen on `port`, its output discarded) and waits
    /// until it accepts connections; panics naming `what` and `hint` when it cannot start.
    pub fn spawn(
        mut command: std::process::Command,
        port: u16,
        what: &str,
        hint: &str,
        timeout: std::time::Duration,
    ) -> Self {
        let child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{what} ({hint}): {e}"));
        let server = Self { child, port };
        let deadline = std::time::Instant::now() + timeout;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what} did not start listening on port {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        server
    }

    /// Its URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_splits_into_status_and_body() {
        assert_eq!(
            parse_response("HTTP/1.0 404 Not Found\r\ncontent-length: 2\r\n\r\nno"),
            Some((404, "no".to_string()))
        );
        assert_eq!(parse_response(""), None);
        assert_ne!(free_port(), 0);
    }
}

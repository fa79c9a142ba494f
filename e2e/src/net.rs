//! Loopback helpers the tests and benchmarks of every crate share: a free port, and the
//! status and body of a plain HTTP/1.0 response.

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

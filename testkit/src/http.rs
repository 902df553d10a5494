//! A minimal HTTP/1.0 GET (so answers are never chunked), plain or over TLS, and Prometheus text reading.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

/// `GET path` on `addr`; `(status, body)`. Errors (refused, timed out, not
/// HTTP) are returned as text, so a poller can keep polling.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    get(addr, path, None).await
}

/// `GET path` over TLS on `addr` (checked as `127.0.0.1`), trusting the CA
/// certificates in `ca_pem` only; `(status, body)`.
pub async fn https_get(
    addr: SocketAddr,
    path: &str,
    ca_pem: &str,
) -> Result<(u16, String), String> {
    get(addr, path, Some(ca_pem)).await
}

async fn get(addr: SocketAddr, path: &str, tls: Option<&str>) -> Result<(u16, String), String> {
    let answer = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        match tls {
            None => exchange(stream, addr, path).await,
            Some(ca_pem) => {
                let host = addr.ip().to_string();
                let stream = crate::tls::connect(stream, &host, ca_pem, b"http/1.1").await?;
                exchange(stream, addr, path).await
            }
        }
    };
    let response = timeout(Duration::from_secs(5), answer)
        .await
        .map_err(|_| format!("GET {path} on {addr} timed out"))??;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad HTTP answer from {addr}: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Writes an HTTP/1.0 GET and reads the whole answer.
async fn exchange(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    addr: SocketAddr,
    path: &str,
) -> Result<Vec<u8>, String> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    // A TLS peer may close without close_notify after the answer: what was
    // read by then is the answer.
    match stream.read_to_end(&mut response).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    Ok(response)
}

/// The value of sample `name` (with its labels, e.g.
/// `x_total{reason="change"}`) in Prometheus text.
pub fn metric_value(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_metric_values() {
        let text = "# HELP x\nentity_sync_connections 12\n\
                    entity_sync_resolve_requests_total{reason=\"subscribe\"} 5\n\
                    entity_sync_resolve_requests_total{reason=\"change\"} 200\n";
        assert_eq!(metric_value(text, "entity_sync_connections"), Some(12.0));
        assert_eq!(
            metric_value(
                text,
                "entity_sync_resolve_requests_total{reason=\"change\"}"
            ),
            Some(200.0)
        );
        assert_eq!(metric_value(text, "entity_sync_conn"), None);
    }
}

//! --max-resolver-streams-per-credential: the `Resolve` streams each
//! credential holds on this node.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tonic::Status;

use crate::grpc::auth::{Granted, certificate_id};

/// Whom a `Resolve` stream counts against for
/// --max-resolver-streams-per-credential: its token; without one, its
/// client certificate; without either (an open port), its peer's IP address.
pub(super) fn quota_key(
    granted: &Granted,
    peer_certs: Option<&Vec<tonic::transport::CertificateDer<'static>>>,
    peer: Option<SocketAddr>,
) -> String {
    if let Some(credential) = granted {
        return format!("token {}", credential.id);
    }
    if let Some(cert) = peer_certs.and_then(|certs| certs.first()) {
        return format!("certificate {}", certificate_id(cert));
    }
    match peer {
        Some(peer) => format!("address {}", peer.ip()),
        None => "unknown".to_owned(),
    }
}

/// `Resolve` streams held per credential (see [`quota_key`]); a cheap-clone handle.
#[derive(Clone)]
pub(super) struct StreamQuotas {
    held: Arc<Mutex<HashMap<String, usize>>>,
    max: usize,
}

/// One stream's place in its credential's quota, given back on drop.
pub(super) struct QuotaSlot {
    quotas: StreamQuotas,
    key: String,
}

impl StreamQuotas {
    pub(super) fn new(max: usize) -> Self {
        StreamQuotas {
            held: Arc::default(),
            max,
        }
    }

    /// A slot for `key`, or RESOURCE_EXHAUSTED naming the flag.
    pub(super) fn take(&self, key: String) -> Result<QuotaSlot, Status> {
        let mut held = self.held.lock().unwrap();
        let count = held.entry(key.clone()).or_default();
        if *count >= self.max {
            tracing::info!(credential = %key, max = self.max, "Register refused: the credential holds its maximum of resolver streams");
            return Err(Status::resource_exhausted(format!(
                "this credential holds its maximum of {} resolver streams on this node \
                 (--max-resolver-streams-per-credential)",
                self.max
            )));
        }
        *count += 1;
        Ok(QuotaSlot {
            quotas: self.clone(),
            key,
        })
    }
}

impl Drop for QuotaSlot {
    fn drop(&mut self) {
        let mut held = self.quotas.held.lock().unwrap();
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

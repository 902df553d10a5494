//! The gate in front of `entitysync.v1.EntitySync`: the bearer token checked from a call's headers, before tonic reads any of its body, and a message-size bound per method.
//!
//! tonic decodes a unary request's whole message (up to its size limit)
//! before the handler runs, so a check inside `Notify` came after the node
//! had buffered what an unknown caller sent. [`Gate`] answers a call without
//! a usable token from its headers alone (UNAUTHENTICATED or
//! PERMISSION_DENIED, as the handler would); its body is never read. Calls
//! that pass go to one of two copies of the generated server, each with the
//! decoding limit of its method, since tonic has one limit per service.

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use tonic::{
    body::Body,
    codegen::{BoxFuture, Service, http},
    server::NamedService,
};

use crate::grpc::auth::{Auth, Granted, Role};

/// What the gate granted a call (in its extensions), so that the handler
/// does not hash and compare the token again.
#[derive(Clone)]
pub(crate) struct Checked(pub(crate) Granted);

/// A service (the generated `EntitySyncServer`) behind the credential check.
#[derive(Clone)]
pub(crate) struct Gate<S> {
    auth: Auth,
    /// For `Notify`, with its own decoding limit.
    notify: S,
    /// For `Resolve` (and anything else, which tonic answers UNIMPLEMENTED).
    rest: S,
}

impl<S> Gate<S> {
    pub(crate) fn new(auth: Auth, notify: S, rest: S) -> Self {
        Gate { auth, notify, rest }
    }
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

/// The method of a call to service `service`: `/{service}/{method}`.
fn method<'a>(path: &'a str, service: &str) -> Option<&'a str> {
    path.strip_prefix('/')?
        .strip_prefix(service)?
        .strip_prefix('/')
}

impl<S> Service<http::Request<Body>> for Gate<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + NamedService,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Generated servers are always ready; both copies are asked anyway.
        match (self.notify.poll_ready(cx), self.rest.poll_ready(cx)) {
            (Poll::Ready(_), Poll::Ready(_)) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let role = match method(request.uri().path(), S::NAME) {
            Some("Notify") => Some(Role::Notifier),
            Some("Resolve") => Some(Role::Resolver),
            _ => None,
        };
        let mut request = request;
        if let Some(role) = role {
            match self.auth.check_headers(request.headers(), role) {
                // The handler takes the credential from here: one check per call.
                Ok(granted) => {
                    request.extensions_mut().insert(Checked(granted));
                }
                // Answered from the headers; the body is dropped unread.
                Err(status) => return Box::pin(std::future::ready(Ok(status.into_http()))),
            }
        }
        match role {
            Some(Role::Notifier) => Box::pin(self.notify.call(request)),
            _ => Box::pin(self.rest.call(request)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_read_from_the_path_of_their_service() {
        let service = "entitysync.v1.EntitySync";
        assert_eq!(
            method("/entitysync.v1.EntitySync/Notify", service),
            Some("Notify")
        );
        assert_eq!(
            method("/entitysync.v1.EntitySync/Resolve", service),
            Some("Resolve")
        );
        assert_eq!(method("/grpc.health.v1.Health/Check", service), None);
        assert_eq!(method("/entitysync.v1.EntitySyncX/Notify", service), None);
    }
}

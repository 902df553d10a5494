//! The handler traits: what an entity's resolver and the pass-through receiver are.
//!
//! Both are implemented for closures and `async fn`s, so a backend writes
//! `|req: ResolveRequest| async move { ... }` and never names these traits.

use std::{future::Future, pin::Pin, sync::Arc};

use futures_util::future::join_all;

use crate::{Answer, Answers, PassThrough, ResolveRequest};

/// Any error a handler may return; its text is logged by the backend, never
/// sent to the node.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A boxed, sendable future.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a resolve handler may return: [`Answers`], or a `Result` of them
/// (an `Err` answers every id of the request with an error).
pub trait IntoAnswers: Send {
    fn into_answers(self) -> Result<Answers, BoxError>;
}

impl IntoAnswers for Answers {
    fn into_answers(self) -> Result<Answers, BoxError> {
        Ok(self)
    }
}

impl<E: Into<BoxError> + Send> IntoAnswers for Result<Answers, E> {
    fn into_answers(self) -> Result<Answers, BoxError> {
        self.map_err(Into::into)
    }
}

/// Resolves the rows of one entity. Called concurrently, once per request
/// (a request carries one or several ids).
pub trait Handler: Send + Sync + 'static {
    fn resolve(&self, request: ResolveRequest) -> BoxFuture<Result<Answers, BoxError>>;
}

impl<F, Fut, R> Handler for F
where
    F: Fn(ResolveRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoAnswers + 'static,
{
    fn resolve(&self, request: ResolveRequest) -> BoxFuture<Result<Answers, BoxError>> {
        let answer = self(request);
        Box::pin(async move { answer.await.into_answers() })
    }
}

/// Receives client messages that carry no `action`.
pub trait PassThroughHandler: Send + Sync + 'static {
    fn receive(&self, message: PassThrough) -> BoxFuture<()>;
}

impl<F, Fut> PassThroughHandler for F
where
    F: Fn(PassThrough) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn receive(&self, message: PassThrough) -> BoxFuture<()> {
        Box::pin(self(message))
    }
}

/// A handler that answers one id at a time, like the original entity-sync's
/// per-key handlers: `f` gets the id and the request, and is called for
/// every id of a request concurrently.
///
/// ```
/// use entity_sync_backend::{Answer, Backend, FetchMode, each_id};
///
/// let builder = Backend::builder("http://127.0.0.1:50051").name("docs").entity(
///     "docs",
///     FetchMode::PerSubscriber,
///     each_id(|id, req| async move {
///         if req.secret() == "s3cret" {
///             Answer::row(serde_json::json!({ "id": id }))
///         } else {
///             Answer::forbidden("not yours")
///         }
///     }),
/// );
/// ```
pub fn each_id<F, Fut>(f: F) -> impl Handler
where
    F: Fn(String, Arc<ResolveRequest>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Answer> + Send + 'static,
{
    let f = Arc::new(f);
    move |request: ResolveRequest| {
        let f = f.clone();
        async move {
            let request = Arc::new(request);
            let ids = request.ids().to_vec();
            let answers = join_all(ids.iter().map(|id| f(id.clone(), request.clone()))).await;
            ids.into_iter().zip(answers).collect::<Answers>()
        }
    }
}

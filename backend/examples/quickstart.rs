//! The README's "Write a backend" example: serves `items/{id}` to a node on
//! 127.0.0.1:50051 and notifies one change. Run a node first (`cargo run
//! --release`), then `cargo run -p entity-sync-backend --example quickstart`.

use entity_sync_backend::{Answer, Answers, Backend, FetchMode, Notifier, ResolveRequest};
use serde_json::json;

/// Rows of `items/{id}`: from memory here; a real backend queries its database.
async fn items(req: ResolveRequest) -> Answers {
    let row = |id: &str| match id {
        "101" => Answer::row(json!({"id": 101, "name": "milk", "qty": 2})),
        _ => Answer::not_found(),
    };
    req.ids().iter().map(|id| (id.clone(), row(id))).collect()
}

#[tokio::main]
async fn main() -> Result<(), entity_sync_backend::Error> {
    let node = "http://127.0.0.1:50051";
    let backend = Backend::builder(node)
        .name("grocery")
        .entity("items", FetchMode::Shared, items)
        .build()?;
    // Serves until Ctrl-C; registers again by itself whenever the node restarts.
    let serving = tokio::spawn(backend.serve(async {
        tokio::signal::ctrl_c().await.ok();
    }));
    // After a change in the database: every subscriber of items/101 is pushed.
    let notifier = Notifier::connect(node).await?;
    notifier.notify([("items", 101)]).await?;
    serving.await.expect("the serve task")
}

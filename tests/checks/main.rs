//! Checks of the repository's files against the code, with no NATS and at
//! most one in-process node: the docs (`docs::`), the deployment files
//! (`deploy_files::`) and the JavaScript client's error codes
//! (`client_codes::`).

mod client_codes;
mod deploy_files;
mod docs;

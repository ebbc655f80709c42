//! The loops that carry the planners' decisions out through the IO shell.
//!
//! - [`pool`]: the pool manager: asks [`crate::plan::pool`] what to change, grows the pool
//!   through EC2 (wiring new ENIs on the host), shrinks it and frees ENIs.
//! - [`reconcile`]: applies [`crate::plan::reconcile`]'s plan to the datastore, and cleans up
//!   leaked ENIs.
//! - [`orphans`]: the orphan sweep, releasing addresses of pods whose host veth is gone.

pub mod orphans;
pub mod pool;
pub mod reconcile;

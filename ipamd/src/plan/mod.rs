//! Pure decisions over the store: no IO, no clock, no lock. Each planner takes a view of the
//! datastore (and, for reconcile, instance metadata's and EC2's answers) and the time, and
//! returns what should change; [`crate::run`] carries it out.
//!
//! - [`pool`]: how the warm pool should grow or shrink (the calculator's policy, with the
//!   daemon's memory of its recent decisions and EC2's capacity answers).
//! - [`reconcile`]: how the datastore follows instance metadata and EC2, which ENIs are
//!   leaked.
//! - [`subnets`]: which subnet a new ENI goes to.

pub mod pool;
pub mod reconcile;
pub mod subnets;

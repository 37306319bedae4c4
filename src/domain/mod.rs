//! Pure quota domain: windows, check decisions, rollover and wire-message validation. No IO, no clock reads.

pub mod alerts;
pub mod batch_plan;
pub mod check;
pub mod outcome;
pub mod quota;
pub mod reservation;
pub mod usage;
pub mod window;
pub mod wire;

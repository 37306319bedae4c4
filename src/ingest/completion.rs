//! `Completion`: what the batch writer reports about one event, whatever source it came from.

use futures::future::BoxFuture;

/// The writer's word on one submitted event, given exactly once. Dropping a completion without
/// either call abandons the event: the source keeps it and hands it out again later (for a
/// broker, once the delivery's channel closes), and its event id makes a repeat harmless.
pub trait Completion: Send + Sync + 'static {
    /// The event's effect is committed: the source may forget it.
    fn committed(self: Box<Self>);

    /// The storage refuses the event for good, for `reason`: the source sets it aside as refused
    /// (a dead letter), then forgets it. Resolves once the source has done so or given up.
    fn refused(self: Box<Self>, reason: String) -> BoxFuture<'static, ()>;
}

//! Entity for `alert_outbox`: a threshold crossing of one key in one window, until and after the
//! broker confirmed its alert.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "alert_outbox")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub api_key_id: i64,
    pub period_start: DateTimeUtc,
    pub threshold_percent: i32,
    pub username: String,
    pub token_quota_monthly: i64,
    pub tokens_used_this_month: i64,
    pub quota_reset_at: DateTimeUtc,
    pub occurred_at: DateTimeUtc,
    /// `None` until the broker confirmed the alert.
    pub published_at: Option<DateTimeUtc>,
    /// Set by `reset_usage`: the next crossing fires again (the row is reused).
    pub rearmed: bool,
    /// Bumped by every firing, so the publisher marks only the firing it sent.
    pub revision: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

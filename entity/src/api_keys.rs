//! Entity for `api_keys`: one row per API key with its quota and current window.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "api_keys")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub username: String,
    #[sea_orm(column_type = "Text")]
    pub description: String,
    pub created_at: DateTimeUtc,
    /// `None` means unlimited.
    pub token_quota_monthly: Option<i64>,
    pub tokens_used_this_month: i64,
    /// End of the current window: 00:00 UTC on the 1st of the next month.
    pub quota_reset_at: DateTimeUtc,
    /// Bumped by every write of `tokens_used_this_month` or `quota_reset_at`.
    pub counter_version: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(has_many = "super::usage_history::Entity")]
    UsageHistory,
}

impl Related<super::usage_history::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::UsageHistory.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}

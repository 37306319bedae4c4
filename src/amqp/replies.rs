//! Check replies: a lane's own reply channel, reopened when the broker closes it, and the
//! validation of `reply_to` names before anything is published to them.
//!
//! RabbitMQ 3.10 decodes a direct reply-to name (`amq.rabbitmq.reply-to.<pid>.<key>`) when a reply
//! is published to it, and a name whose pid part does not decode fails the publishing channel
//! with `INTERNAL_ERROR`. One crafted check could thus silence every later reply of its lane, so
//! such names are refused here, and a reply channel that fails anyway is replaced.

use std::sync::Arc;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Connection};

/// What every direct reply-to name the broker hands out starts with.
const DIRECT_REPLY_TO_PREFIX: &str = "amq.rabbitmq.reply-to.";
/// The pseudo-queue a client consumes; only the broker's expanded names can be replied to.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Why a `reply_to` cannot be published to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidReplyTo {
    #[error("reply_to is empty")]
    Empty,
    #[error("reply_to names the direct reply-to pseudo-queue itself, not a client's")]
    Unexpanded,
    #[error("reply_to is not a direct reply-to name RabbitMQ hands out")]
    MalformedDirectReplyTo,
}

/// Whether a reply may be published to `reply_to`. A plain queue name is fine (an unknown one
/// just drops the reply); a direct reply-to name must be `amq.rabbitmq.reply-to.` followed by the
/// base64 of an Erlang pid term, a dot and a non-empty base64 key, as RabbitMQ 3.10 makes them
/// (e.g. `amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AABO1AAAAABrBvI1.sPS1+J/AXyeXa+opPKNszQ==`).
pub fn validate_reply_to(reply_to: &str) -> Result<(), InvalidReplyTo> {
    if reply_to.is_empty() {
        return Err(InvalidReplyTo::Empty);
    }
    if reply_to == DIRECT_REPLY_TO {
        return Err(InvalidReplyTo::Unexpanded);
    }
    let Some(suffix) = reply_to.strip_prefix(DIRECT_REPLY_TO_PREFIX) else {
        return Ok(());
    };
    let (pid, key) = suffix
        .split_once('.')
        .ok_or(InvalidReplyTo::MalformedDirectReplyTo)?;
    let key_is_base64 = !key.is_empty()
        && key
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'+' | b'/' | b'='));
    let pid_is_a_pid_term = decode_base64(pid).is_some_and(|term| is_pid_term(&term));
    if key_is_base64 && pid_is_a_pid_term {
        Ok(())
    } else {
        Err(InvalidReplyTo::MalformedDirectReplyTo)
    }
}

/// Strict standard base64 with padding; `None` for anything else.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    fn value(symbol: u8) -> Option<u32> {
        Some(match symbol {
            b'A'..=b'Z' => symbol - b'A',
            b'a'..=b'z' => symbol - b'a' + 26,
            b'0'..=b'9' => symbol - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = text.as_bytes();
    if bytes.is_empty() || !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut decoded = Vec::with_capacity(bytes.len() / 4 * 3);
    let quads = bytes.len() / 4;
    for (index, quad) in bytes.chunks_exact(4).enumerate() {
        let padding = quad.iter().rev().take_while(|&&byte| byte == b'=').count();
        if padding > 2 || (padding > 0 && index + 1 != quads) {
            return None;
        }
        let mut group = 0u32;
        for &symbol in &quad[..4 - padding] {
            group = (group << 6) | value(symbol)?;
        }
        group <<= 6 * padding as u32;
        let group = group.to_be_bytes();
        decoded.extend_from_slice(&group[1..4 - padding]);
    }
    Some(decoded)
}

/// Whether `term` is exactly one Erlang external-format pid: version 131, `NEW_PID_EXT` (88) or
/// `PID_EXT` (103), a node-name atom, then the id, serial and creation fields.
fn is_pid_term(term: &[u8]) -> bool {
    const VERSION: u8 = 131;
    const NEW_PID_EXT: u8 = 88;
    const PID_EXT: u8 = 103;
    const ATOM_EXT: u8 = 100;
    const SMALL_ATOM_EXT: u8 = 115;
    const ATOM_UTF8_EXT: u8 = 118;
    const SMALL_ATOM_UTF8_EXT: u8 = 119;
    let [VERSION, tag @ (NEW_PID_EXT | PID_EXT), atom_tag, rest @ ..] = term else {
        return false;
    };
    let (name_length, rest) = match (*atom_tag, rest) {
        (ATOM_EXT | ATOM_UTF8_EXT, [high, low, rest @ ..]) => {
            (usize::from(u16::from_be_bytes([*high, *low])), rest)
        }
        (SMALL_ATOM_EXT | SMALL_ATOM_UTF8_EXT, [length, rest @ ..]) => (usize::from(*length), rest),
        _ => return false,
    };
    // id (4), serial (4), then creation: 4 bytes in NEW_PID_EXT, 1 in PID_EXT.
    let fields = if *tag == NEW_PID_EXT { 12 } else { 9 };
    name_length > 0
        && rest.len() == name_length + fields
        && std::str::from_utf8(&rest[..name_length]).is_ok_and(|node| node.contains('@'))
}

/// A lane's channel for check replies, reopened on the lane's connection when the broker has
/// closed it, so a failed reply never ends the consuming session.
pub struct ReplyChannel {
    connection: Arc<Connection>,
    channel: tokio::sync::Mutex<Channel>,
}

impl ReplyChannel {
    pub async fn open(connection: Arc<Connection>) -> Result<ReplyChannel, lapin::Error> {
        let channel = connection.create_channel().await?;
        Ok(ReplyChannel::with_channel(connection, channel))
    }

    /// Starts with `channel`, a channel of `connection`.
    pub fn with_channel(connection: Arc<Connection>, channel: Channel) -> ReplyChannel {
        ReplyChannel {
            connection,
            channel: tokio::sync::Mutex::new(channel),
        }
    }

    /// Publishes one reply to the default exchange; the caller validated `reply_to`.
    pub async fn publish(
        &self,
        reply_to: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), lapin::Error> {
        let channel = self.usable_channel().await?;
        channel
            .basic_publish(
                "".into(),
                reply_to.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .map(drop)
    }

    /// The current channel, or a new one if the broker closed it.
    async fn usable_channel(&self) -> Result<Channel, lapin::Error> {
        let mut channel = self.channel.lock().await;
        if !channel.status().connected() {
            tracing::warn!("the reply channel was closed; opening another");
            *channel = self.connection.create_channel().await?;
        }
        Ok(channel.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REAL: &str =
        "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AABO1AAAAABrBvI1.sPS1+J/AXyeXa+opPKNszQ==";

    #[test]
    fn names_the_broker_hands_out_and_plain_queues_are_valid() {
        assert_eq!(validate_reply_to(REAL), Ok(()));
        assert_eq!(validate_reply_to("my-replies"), Ok(()));
        assert_eq!(validate_reply_to("amq.gen-JzTY20BRgKO-HjmUJj0wLg"), Ok(()));
    }

    #[test]
    fn crafted_direct_reply_to_names_are_refused() {
        for name in [
            "amq.rabbitmq.reply-to.g1h2AA==.zzz",
            "amq.rabbitmq.reply-to",
            "amq.rabbitmq.reply-to.",
            "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AABO1AAAAABrBvI1",
            "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AABO1AAAAABrBvI1.",
            "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AABO1AAAAABrBvI.sPS1",
            "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AABO1AAAAABrBvI1AAAA.sPS1",
            "amq.rabbitmq.reply-to.!!!!.sPS1",
            "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AABO1AAAAABrBvI1.a b",
            "",
        ] {
            assert!(validate_reply_to(name).is_err(), "{name:?} must be refused");
        }
    }

    #[test]
    fn base64_is_decoded_strictly() {
        assert_eq!(decode_base64("aGk="), Some(b"hi".to_vec()));
        assert_eq!(decode_base64("aGkh"), Some(b"hi!".to_vec()));
        assert_eq!(decode_base64("aA=="), Some(b"h".to_vec()));
        assert_eq!(decode_base64("aGk"), None);
        assert_eq!(decode_base64("a==="), None);
        assert_eq!(decode_base64("aA==aGkh"), None);
    }
}

//! The MQTT control plane of pre-warming (install guide §6.2), as plain code: topic names,
//! message bodies, and the size and schema checks every received message passes before anything
//! acts on it.
//!
//! Topics (QoS 1):
//! - `cvmfs/receivers/<node>/presence` — retained [`Presence`]; a receiver's last will says
//!   `online: false`.
//! - `cvmfs/repos/<repo>/announce` — [`Announce`] from a publisher: a payload about to be
//!   pushed.
//! - `cvmfs/publishers/<publisher>/ready/<payload>/<node>` — [`Ready`] from a receiver: where
//!   to push, with which upload token, and which objects it lacks (or why it cannot take the
//!   payload).
//!
//! Identities are certificate common names: the broker maps each client certificate's CN to its
//! user name and its ACL lets a node publish only under its own name. A message whose body names
//! another node than its topic is refused here as well.

use serde::{Deserialize, Serialize};

use crate::hash::ObjectId;

/// Largest announce or ready message accepted (JSON; about a million object names).
pub const MAX_LIST_MESSAGE: usize = 48 << 20;
/// Most object names one announce or ready message may carry; bigger payloads are announced
/// without the list, and receivers are asked over HTTP (the inventory endpoint).
pub const MAX_OBJECTS: usize = 1_000_000;
/// Largest presence message accepted.
pub const MAX_PRESENCE: usize = 64 << 10;

/// Why a received message was ignored (also the `reason` label of the metric counting them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("message of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("topic '{0}' is not one this node handles")]
    Topic(String),
    #[error("malformed message: {0}")]
    Schema(String),
    #[error("the message names {body} but its topic names {topic}")]
    Mismatch { topic: String, body: String },
}

impl Reject {
    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Reject::TooLarge(_) => "too-large",
            Reject::Topic(_) => "topic",
            Reject::Schema(_) => "schema",
            Reject::Mismatch { .. } => "node-mismatch",
        }
    }
}

/// A topic segment (node id, publisher id, payload id, repository name): 1–128 characters from
/// `A-Z a-z 0-9 . _ -`, not `.` or `..`. Rules out MQTT wildcards, separators and NUL.
pub fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub fn presence_topic(node: &str) -> String {
    format!("cvmfs/receivers/{node}/presence")
}

pub fn announce_topic(repo: &str) -> String {
    format!("cvmfs/repos/{repo}/announce")
}

pub fn ready_topic(publisher: &str, payload: &str, node: &str) -> String {
    format!("cvmfs/publishers/{publisher}/ready/{payload}/{node}")
}

/// The subscription a publisher needs for all its ready answers.
pub fn ready_filter(publisher: &str) -> String {
    format!("cvmfs/publishers/{publisher}/ready/+/+")
}

/// A receiver's retained presence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Presence {
    pub node_id: String,
    pub online: bool,
    /// True once the receiver's inventory filter is built (announces are answered from then).
    pub bloom_ready: bool,
    pub repos: Vec<String>,
    /// Where publishers push objects (the receiver's HTTP endpoint).
    pub data_url: String,
    pub version: String,
}

/// A publisher's announcement of a payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Announce {
    pub payload_id: String,
    pub publisher_id: String,
    pub repo: String,
    /// Number of data objects in the payload.
    pub object_count: u64,
    /// Bytes of new data in the payload (for the receiver's space check).
    pub bytes: u64,
    /// The payload's data object names; absent when there are more than [`MAX_OBJECTS`].
    #[serde(default)]
    pub objects: Option<Vec<String>>,
}

/// A receiver's answer to an announcement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    pub node_id: String,
    pub payload_id: String,
    /// The receiver's data endpoint (always given, so a refusal can be matched to an endpoint).
    pub data_url: String,
    /// Short-lived bearer token for the data channel, scoped to the announced repository.
    #[serde(default)]
    pub upload_token: Option<String>,
    /// The announced objects it lacks; absent when the announcement carried no list.
    #[serde(default)]
    pub absent: Option<Vec<String>>,
    /// Set when it cannot take the payload (and then nothing else is).
    #[serde(default)]
    pub error: Option<String>,
}

fn schema(e: impl std::fmt::Display) -> Reject {
    Reject::Schema(e.to_string())
}

fn check_segment(what: &str, s: &str) -> Result<(), Reject> {
    if valid_segment(s) {
        Ok(())
    } else {
        Err(Reject::Schema(format!(
            "{what} '{}' is not valid",
            s.escape_debug()
        )))
    }
}

/// Parses a list of object names, refusing anything that is not one.
pub fn parse_objects(list: &[String]) -> Result<Vec<ObjectId>, Reject> {
    if list.len() > MAX_OBJECTS {
        return Err(Reject::Schema(format!(
            "{} objects, at most {MAX_OBJECTS}",
            list.len()
        )));
    }
    list.iter()
        .map(|s| {
            ObjectId::parse(s).map_err(|_| Reject::Schema(format!("'{s}' is not an object name")))
        })
        .collect()
}

/// Checks a received announcement against its topic.
pub fn parse_announce(topic: &str, body: &[u8]) -> Result<Announce, Reject> {
    if body.len() > MAX_LIST_MESSAGE {
        return Err(Reject::TooLarge(body.len()));
    }
    let repo = topic
        .strip_prefix("cvmfs/repos/")
        .and_then(|r| r.strip_suffix("/announce"))
        .filter(|r| valid_segment(r))
        .ok_or_else(|| Reject::Topic(topic.to_string()))?;
    let a: Announce = serde_json::from_slice(body).map_err(schema)?;
    check_segment("payload_id", &a.payload_id)?;
    check_segment("publisher_id", &a.publisher_id)?;
    check_segment("repo", &a.repo)?;
    if a.repo != repo {
        return Err(Reject::Mismatch {
            topic: repo.to_string(),
            body: a.repo,
        });
    }
    if let Some(list) = &a.objects {
        parse_objects(list)?;
        if list.len() as u64 != a.object_count {
            return Err(Reject::Schema(format!(
                "object_count {} but {} objects listed",
                a.object_count,
                list.len()
            )));
        }
    }
    Ok(a)
}

/// Checks a received ready answer against its topic: the publisher must be `publisher` and
/// the node in the body must be the node in the topic.
pub fn parse_ready(publisher: &str, topic: &str, body: &[u8]) -> Result<Ready, Reject> {
    if body.len() > MAX_LIST_MESSAGE {
        return Err(Reject::TooLarge(body.len()));
    }
    let rest = topic
        .strip_prefix("cvmfs/publishers/")
        .and_then(|r| r.strip_prefix(publisher))
        .and_then(|r| r.strip_prefix("/ready/"))
        .ok_or_else(|| Reject::Topic(topic.to_string()))?;
    let (payload, node) = rest
        .split_once('/')
        .filter(|(p, n)| valid_segment(p) && valid_segment(n))
        .ok_or_else(|| Reject::Topic(topic.to_string()))?;
    let r: Ready = serde_json::from_slice(body).map_err(schema)?;
    if r.node_id != node {
        return Err(Reject::Mismatch {
            topic: node.to_string(),
            body: r.node_id,
        });
    }
    if r.payload_id != payload {
        return Err(Reject::Mismatch {
            topic: payload.to_string(),
            body: r.payload_id,
        });
    }
    let u = &r.data_url;
    if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() > 1024 {
        return Err(Reject::Schema(format!(
            "data_url '{}' is not an http(s) URL",
            u.escape_debug()
        )));
    }
    match (&r.error, &r.upload_token) {
        (Some(e), _) if e.len() > 1024 => return Err(Reject::Schema("error text too long".into())),
        (Some(_), _) => {}
        (None, Some(t)) => {
            if t.len() < 16 || t.len() > 256 || !t.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(Reject::Schema("upload_token is malformed".into()));
            }
        }
        (None, None) => {
            return Err(Reject::Schema(
                "a ready answer needs upload_token, or error".into(),
            ))
        }
    }
    if let Some(list) = &r.absent {
        parse_objects(list)?;
    }
    Ok(r)
}

/// Checks a received presence message against its topic.
pub fn parse_presence(topic: &str, body: &[u8]) -> Result<Presence, Reject> {
    if body.len() > MAX_PRESENCE {
        return Err(Reject::TooLarge(body.len()));
    }
    let node = topic
        .strip_prefix("cvmfs/receivers/")
        .and_then(|r| r.strip_suffix("/presence"))
        .filter(|n| valid_segment(n))
        .ok_or_else(|| Reject::Topic(topic.to_string()))?;
    let p: Presence = serde_json::from_slice(body).map_err(schema)?;
    if p.node_id != node {
        return Err(Reject::Mismatch {
            topic: node.to_string(),
            body: p.node_id,
        });
    }
    for r in &p.repos {
        check_segment("repo", r)?;
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "0123456789abcdef0123456789abcdef01234567";

    fn ready(node: &str, payload: &str) -> Ready {
        Ready {
            node_id: node.into(),
            payload_id: payload.into(),
            data_url: "https://s1.example.org:9100".into(),
            upload_token: Some("a".repeat(32)),
            absent: Some(vec![H.into(), format!("{H}P")]),
            error: None,
        }
    }

    #[test]
    fn segments_rule_out_wildcards_and_separators() {
        for ok in ["stratum1-cern", "atlas.cern.ch", "job_1", "0f3a"] {
            assert!(valid_segment(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "+",
            "#",
            "a+b",
            "a\0b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(!valid_segment(bad), "{bad:?}");
        }
    }

    #[test]
    fn ready_answers_must_match_their_topic() {
        let t = ready_topic("pub", "job1", "s1-a");
        let body = serde_json::to_vec(&ready("s1-a", "job1")).unwrap();
        assert_eq!(
            parse_ready("pub", &t, &body).unwrap(),
            ready("s1-a", "job1")
        );
        // Another node's name in the body.
        let forged = serde_json::to_vec(&ready("s1-b", "job1")).unwrap();
        assert_eq!(
            parse_ready("pub", &t, &forged).unwrap_err().label(),
            "node-mismatch"
        );
        // Another payload.
        let other = serde_json::to_vec(&ready("s1-a", "job2")).unwrap();
        assert_eq!(
            parse_ready("pub", &t, &other).unwrap_err().label(),
            "node-mismatch"
        );
        // For another publisher, or not a ready topic.
        assert_eq!(
            parse_ready("other", &t, &body).unwrap_err().label(),
            "topic"
        );
        assert_eq!(
            parse_ready("pub", "cvmfs/publishers/pub/ready/job1", &body)
                .unwrap_err()
                .label(),
            "topic"
        );
        // Unknown fields, bad names, missing token, bad URL, oversize.
        let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["extra"] = 1.into();
        assert_eq!(
            parse_ready("pub", &t, v.to_string().as_bytes())
                .unwrap_err()
                .label(),
            "schema"
        );
        let mut r = ready("s1-a", "job1");
        r.absent = Some(vec!["../../etc/passwd".into()]);
        assert!(parse_ready("pub", &t, &serde_json::to_vec(&r).unwrap()).is_err());
        let mut r = ready("s1-a", "job1");
        r.upload_token = None;
        assert!(parse_ready("pub", &t, &serde_json::to_vec(&r).unwrap()).is_err());
        let mut r = ready("s1-a", "job1");
        r.data_url = "file:///etc".into();
        assert!(parse_ready("pub", &t, &serde_json::to_vec(&r).unwrap()).is_err());
        let big = vec![b' '; MAX_LIST_MESSAGE + 1];
        assert_eq!(
            parse_ready("pub", &t, &big).unwrap_err(),
            Reject::TooLarge(MAX_LIST_MESSAGE + 1)
        );
        // A refusal carries only the reason.
        let no = Ready {
            node_id: "s1-a".into(),
            payload_id: "job1".into(),
            data_url: "https://s1.example.org:9100".into(),
            upload_token: None,
            absent: None,
            error: Some("insufficient storage".into()),
        };
        assert!(parse_ready("pub", &t, &serde_json::to_vec(&no).unwrap()).is_ok());
    }

    #[test]
    fn announces_are_checked() {
        let a = Announce {
            payload_id: "job1".into(),
            publisher_id: "pub".into(),
            repo: "atlas.cern.ch".into(),
            object_count: 1,
            bytes: 10,
            objects: Some(vec![H.into()]),
        };
        let body = serde_json::to_vec(&a).unwrap();
        assert_eq!(
            parse_announce(&announce_topic("atlas.cern.ch"), &body).unwrap(),
            a
        );
        assert_eq!(
            parse_announce(&announce_topic("cms.cern.ch"), &body)
                .unwrap_err()
                .label(),
            "node-mismatch"
        );
        let mut b = a.clone();
        b.object_count = 2;
        assert!(parse_announce(
            &announce_topic("atlas.cern.ch"),
            &serde_json::to_vec(&b).unwrap()
        )
        .is_err());
        let mut b = a.clone();
        b.publisher_id = "pub/+".into();
        assert!(parse_announce(
            &announce_topic("atlas.cern.ch"),
            &serde_json::to_vec(&b).unwrap()
        )
        .is_err());
        assert_eq!(
            parse_announce("cvmfs/repos/+/announce", &body)
                .unwrap_err()
                .label(),
            "topic"
        );
        assert_eq!(
            parse_announce(&announce_topic("atlas.cern.ch"), b"{not json")
                .unwrap_err()
                .label(),
            "schema"
        );
    }

    #[test]
    fn presence_is_checked() {
        let p = Presence {
            node_id: "s1-a".into(),
            online: true,
            bloom_ready: true,
            repos: vec!["atlas.cern.ch".into()],
            data_url: "https://s1:9100".into(),
            version: "0.1.0".into(),
        };
        let body = serde_json::to_vec(&p).unwrap();
        assert_eq!(parse_presence(&presence_topic("s1-a"), &body).unwrap(), p);
        assert_eq!(
            parse_presence(&presence_topic("s1-b"), &body)
                .unwrap_err()
                .label(),
            "node-mismatch"
        );
    }
}

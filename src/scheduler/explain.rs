//! Why a host was refused, and a pool-wide summary when no host fits.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::pool::Resource;
use crate::pool::table::thousands;

/// The first filter a host failed.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "filter", rename_all = "snake_case")]
pub enum Rejection {
    /// The host is disabled.
    Disabled,
    /// A required label is missing or different.
    Label {
        /// Label key.
        key: String,
        /// Required value.
        want: String,
    },
    /// The host already holds a VM of the request's anti-affinity group.
    Group {
        /// The group.
        group: String,
    },
    /// The host has its maximum number of VMs.
    MaxVms {
        /// The limit.
        max: u64,
    },
    /// The request breaks the host's per-request min/max/step for a resource.
    Limit {
        /// The resource.
        resource: Resource,
        /// How.
        reason: String,
    },
    /// The host lacks free capacity of a resource.
    Lacks {
        /// The resource.
        resource: Resource,
        /// What the request needs.
        need: u64,
        /// What the host has free.
        free: u64,
    },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Disabled => write!(f, "disabled"),
            Rejection::Label { key, want } => write!(f, "fails label {key}={want}"),
            Rejection::Group { group } => write!(f, "already holds a VM of group {group}"),
            Rejection::MaxVms { max } => write!(f, "has its maximum of {max} VMs"),
            Rejection::Limit { resource, reason } => write!(f, "refuses this {resource}: {reason}"),
            Rejection::Lacks {
                resource,
                need,
                free,
            } => write!(
                f,
                "lacks {resource} (need {}, free {})",
                resource.show(*need),
                resource.show(*free)
            ),
        }
    }
}

/// Counts of rejections over the whole pool, grouped into readable classes.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Hosts in the pool.
    pub hosts: u64,
    /// Class → (hosts in it, the most free of the resource among them, for "lacks").
    pub classes: BTreeMap<String, (u64, Option<u64>)>,
    /// Classes in the order first seen, for stable messages.
    #[serde(skip)]
    order: Vec<String>,
}

impl Summary {
    /// An empty summary over a pool of `hosts` hosts.
    pub fn new(hosts: u64) -> Summary {
        Summary {
            hosts,
            ..Summary::default()
        }
    }

    /// Counts one rejected host.
    pub fn add(&mut self, r: &Rejection) {
        let (class, free) = match r {
            Rejection::Disabled => ("disabled".to_string(), None),
            Rejection::Label { key, want } => (format!("fail label {key}={want}"), None),
            Rejection::Group { group } => (format!("hold group {group}"), None),
            Rejection::MaxVms { .. } => ("are at their VM limit".to_string(), None),
            Rejection::Limit { resource, reason } => {
                (format!("refuse this {resource} ({reason})"), None)
            }
            Rejection::Lacks {
                resource,
                need,
                free,
            } => (
                format!("lack {resource} (need {}", resource.show(*need)),
                Some(*free),
            ),
        };
        let entry = self.classes.entry(class.clone()).or_insert_with(|| {
            self.order.push(class);
            (0, None)
        });
        entry.0 += 1;
        if let Some(f) = free {
            entry.1 = Some(entry.1.map_or(f, |m: u64| m.max(f)));
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.hosts == 0 {
            return write!(f, "no host fits: the pool has no hosts");
        }
        write!(f, "no host fits: ")?;
        let mut classes: Vec<&String> = self.order.iter().collect();
        // Biggest reasons first; ties keep first-seen order.
        classes.sort_by_key(|c| std::cmp::Reverse(self.classes[*c].0));
        for (i, class) in classes.iter().enumerate() {
            let (count, most_free) = self.classes[*class];
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{} {class}", thousands(count))?;
            if let Some(m) = most_free {
                // The class text carries the resource's unit in "need N unit".
                let unit = class
                    .rsplit(' ')
                    .next()
                    .filter(|u| u.ends_with("iB"))
                    .unwrap_or("");
                let shown = if unit.is_empty() {
                    m.to_string()
                } else {
                    format!("{m} {unit}")
                };
                write!(f, ", most free {shown})")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_like_the_issue() {
        let mut s = Summary::new(10_000);
        for i in 0..9_812 {
            s.add(&Rejection::Lacks {
                resource: Resource::MemoryMib,
                need: 4096,
                free: 1024 + (i % 3) * 1024,
            });
        }
        for _ in 0..188 {
            s.add(&Rejection::Label {
                key: "zone".into(),
                want: "b".into(),
            });
        }
        assert_eq!(
            s.to_string(),
            "no host fits: 9,812 lack memory (need 4096 MiB, most free 3072 MiB), 188 fail label zone=b"
        );
    }
}

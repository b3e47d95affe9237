//! Users and their passwords, shared by every protocol adapter and the admin API.
//!
//! Passwords are stored hashed the way RabbitMQ stores them
//! (`rabbit_password_hashing_sha256`): base64 of a 4-byte random salt followed by
//! SHA-256(salt ‖ password). `rabbitmqctl hash_password` output can be pasted into
//! mqgate's configuration, and `mqgate hash-password` prints one.

use std::collections::HashMap;

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// A stored password.
#[derive(Clone, PartialEq, Eq)]
pub enum Password {
    /// Salted SHA-256 as RabbitMQ stores it (base64 of salt ‖ digest).
    Sha256(Vec<u8>),
    /// Clear text (for tests and quick starts; the configuration reference says so).
    Plain(String),
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Password::Sha256(_) => "Password::Sha256(..)",
            Password::Plain(_) => "Password::Plain(..)",
        })
    }
}

impl Password {
    /// Parse RabbitMQ's base64 `salt ‖ sha256` form.
    pub fn from_hash(b64: &str) -> Option<Self> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()?;
        (raw.len() == 4 + 32).then_some(Password::Sha256(raw))
    }

    /// Hash `password` with a fresh salt.
    pub fn hash(password: &str) -> Self {
        let mut salt = [0u8; 4];
        getrandom::fill(&mut salt).expect("the OS has randomness");
        Password::Sha256(salted(&salt, password))
    }

    /// The base64 form ([`Password::from_hash`] reads it back).
    pub fn to_hash_string(&self) -> String {
        match self {
            Password::Sha256(raw) => base64::engine::general_purpose::STANDARD.encode(raw),
            Password::Plain(p) => Password::Sha256(salted(&[0; 4], p)).to_hash_string(),
        }
    }

    /// Whether `password` is this one (in time independent of where they differ).
    pub fn verify(&self, password: &str) -> bool {
        match self {
            Password::Sha256(raw) => {
                let expect = salted(&raw[..4], password);
                constant_eq(&expect, raw)
            }
            Password::Plain(p) => constant_eq(p.as_bytes(), password.as_bytes()),
        }
    }
}

fn salted(salt: &[u8], password: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password.as_bytes());
    let mut out = salt.to_vec();
    out.extend_from_slice(&h.finalize());
    out
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A user: a password and tags (`administrator` may use the admin API).
#[derive(Clone, Debug)]
pub struct UserAccount {
    /// Its password.
    pub password: Password,
    /// RabbitMQ-style tags.
    pub tags: Vec<String>,
}

impl UserAccount {
    /// Whether it may use the admin API and CLI.
    pub fn is_admin(&self) -> bool {
        self.tags.iter().any(|t| t == "administrator")
    }
}

/// Users by name.
#[derive(Clone, Debug, Default)]
pub struct Users(pub HashMap<String, UserAccount>);

impl Users {
    /// Add (or replace) a user with a clear-text password and tags.
    pub fn insert_plain(&mut self, name: &str, password: &str, tags: &[&str]) {
        self.0.insert(
            name.to_owned(),
            UserAccount {
                password: Password::Plain(password.to_owned()),
                tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            },
        );
    }

    /// The user, if `password` is right.
    pub fn authenticate(&self, name: &str, password: &str) -> Option<&UserAccount> {
        self.0.get(name).filter(|u| u.password.verify(password))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rabbitmq_hash_verifies() {
        // `rabbitmqctl hash_password guest`-style: salt ‖ sha256(salt ‖ "guest").
        let p = Password::hash("guest");
        let s = p.to_hash_string();
        let back = Password::from_hash(&s).unwrap();
        assert!(back.verify("guest"));
        assert!(!back.verify("Guest"));
        assert!(Password::from_hash("not base64!").is_none());
    }

    #[test]
    fn plain_verifies() {
        assert!(Password::Plain("x".into()).verify("x"));
        assert!(!Password::Plain("x".into()).verify("y"));
    }
}

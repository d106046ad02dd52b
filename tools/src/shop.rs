//! The shop behind stampede-target: accounts, sessions, carts, orders and the product
//! catalogue. Pure state and rules, no HTTP; the service module maps outcomes to statuses.
//!
//! Accounts are implicit (`userN` / `passN` for N in 1..=accounts), so a million accounts
//! cost nothing until they log in. Account state lives in a sharded map behind short
//! per-shard mutexes (never held across an await). A token names its account and session
//! and carries a keyed hash, so the target can tell a forged token (401) from a genuine
//! one whose session a newer login ended (409) without remembering old sessions.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use bytes::Bytes;
use serde::Serialize;

/// Number of products; ids are 1..=PRODUCTS.
pub const PRODUCTS: u32 = 1000;
/// Most items a search returns.
pub const SEARCH_LIMIT: usize = 20;
/// Most units of one product a cart holds; keeps a runaway plan from overflowing totals.
pub const MAX_QTY: u32 = 10_000;

const ACCOUNT_SHARDS: usize = 64;

const COLOURS: [&str; 10] = [
    "Red", "Blue", "Green", "Black", "White", "Yellow", "Grey", "Orange", "Purple", "Silver",
];
const MATERIALS: [&str; 10] = [
    "Oak", "Steel", "Glass", "Cotton", "Leather", "Bamboo", "Copper", "Wool", "Marble", "Ceramic",
];
const THINGS: [&str; 10] = [
    "Chair", "Lamp", "Mug", "Table", "Shelf", "Clock", "Vase", "Bowl", "Stool", "Rug",
];

#[derive(Serialize)]
struct Product {
    id: u32,
    name: String,
    price_cents: u64,
}

/// The fixed catalogue with every common answer pre-rendered, so serving a product or a
/// one-word search is a reference-count bump, not JSON encoding.
struct Catalog {
    names_lower: Vec<String>,
    prices: Vec<u64>,
    product_json: Vec<Bytes>,
    first_page: Bytes,
    by_word: HashMap<String, Bytes>,
    list_json: Vec<String>,
}

impl Catalog {
    fn new() -> Catalog {
        let products: Vec<Product> = (1..=PRODUCTS)
            .map(|id| {
                let j = (id - 1) as usize;
                Product {
                    id,
                    name: format!(
                        "{} {} {}",
                        COLOURS[j % 10],
                        MATERIALS[(j / 10) % 10],
                        THINGS[(j / 100) % 10]
                    ),
                    price_cents: 199 + (j as u64 * 7919) % 9800,
                }
            })
            .collect();
        let list_json: Vec<String> = products
            .iter()
            .map(|p| serde_json::to_string(p).unwrap_or_default())
            .collect();
        let names_lower: Vec<String> = products.iter().map(|p| p.name.to_lowercase()).collect();
        let render = |ids: &mut dyn Iterator<Item = usize>| -> Bytes {
            let items: Vec<&str> = ids
                .take(SEARCH_LIMIT)
                .map(|i| list_json[i].as_str())
                .collect();
            Bytes::from(format!("[{}]", items.join(",")))
        };
        let mut by_word = HashMap::new();
        for word in COLOURS.iter().chain(&MATERIALS).chain(&THINGS) {
            let w = word.to_lowercase();
            let body = render(
                &mut (0..products.len())
                    .filter(|&i| names_lower[i].split(' ').any(|part| part == w)),
            );
            by_word.insert(w, body);
        }
        Catalog {
            first_page: render(&mut (0..products.len())),
            product_json: list_json.iter().map(|s| Bytes::from(s.clone())).collect(),
            prices: products.iter().map(|p| p.price_cents).collect(),
            names_lower,
            by_word,
            list_json,
        }
    }

    fn search(&self, q: &str) -> Bytes {
        let q = q.trim().to_lowercase();
        if q.is_empty() {
            return self.first_page.clone();
        }
        if let Some(body) = self.by_word.get(&q) {
            return body.clone();
        }
        let items: Vec<&str> = (0..self.names_lower.len())
            .filter(|&i| self.names_lower[i].contains(&q))
            .take(SEARCH_LIMIT)
            .map(|i| self.list_json[i].as_str())
            .collect();
        Bytes::from(format!("[{}]", items.join(",")))
    }
}

#[derive(Default)]
struct Account {
    /// The only session of this account that is still valid.
    session: u64,
    /// `(product id, quantity)`; at most one line per product.
    cart: Vec<(u32, u32)>,
    orders: u64,
    spent_cents: u64,
}

/// Why a bearer token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    Missing,
    /// Not a token this target issued.
    Unknown,
    /// A genuine token whose session a newer login of the same account ended.
    Ended,
}

/// Why a cart change was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CartError {
    NoSuchProduct,
    BadQuantity,
}

/// A completed checkout.
#[derive(Clone, Debug, Serialize)]
pub struct Order {
    pub order: u64,
    pub items: u64,
    pub total_cents: u64,
}

/// What `GET /account` shows.
#[derive(Clone, Debug, Serialize)]
pub struct AccountView {
    pub user: String,
    pub orders: u64,
    pub spent_cents: u64,
    pub cart_items: u64,
}

/// A checked token: which account, which session.
#[derive(Clone, Copy, Debug)]
pub struct Session {
    user: u64,
    session: u64,
}

pub(crate) struct Shop {
    accounts: u64,
    shards: Box<[Mutex<HashMap<u64, Account>>]>,
    next_session: AtomicU64,
    next_order: AtomicU64,
    mac_key: RandomState,
    catalog: Catalog,
}

impl Shop {
    pub(crate) fn new(accounts: u64) -> Shop {
        Shop {
            accounts,
            shards: (0..ACCOUNT_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            next_session: AtomicU64::new(1),
            next_order: AtomicU64::new(1),
            mac_key: RandomState::new(),
            catalog: Catalog::new(),
        }
    }

    fn shard(&self, user: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Account>> {
        // A panic elsewhere while holding the lock leaves plain data behind; keep serving.
        self.shards[(user % ACCOUNT_SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn mac(&self, user: u64, session: u64) -> u64 {
        self.mac_key.hash_one((user, session))
    }

    /// Checks `userN` / `passN` and starts a new session, ending the account's previous one.
    /// Returns the token, or `None` for an unknown user or a wrong password.
    pub(crate) fn login(&self, user: &str, password: &str) -> Option<String> {
        let n = parse_numbered(user, "user")?;
        if n == 0 || n > self.accounts || parse_numbered(password, "pass") != Some(n) {
            return None;
        }
        let session = self.next_session.fetch_add(1, Relaxed);
        {
            let mut shard = self.shard(n);
            let account = shard.entry(n).or_default();
            account.session = session;
            account.cart.clear();
        }
        Some(format!("{n}.{session}.{:016x}", self.mac(n, session)))
    }

    /// Checks a bearer token against the account's current session.
    pub(crate) fn authenticate(&self, token: Option<&str>) -> Result<Session, AuthError> {
        let token = token.ok_or(AuthError::Missing)?;
        let mut parts = token.split('.');
        let (Some(u), Some(s), Some(m), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Unknown);
        };
        let (Ok(user), Ok(session), Ok(mac)) = (
            u.parse::<u64>(),
            s.parse::<u64>(),
            u64::from_str_radix(m, 16),
        ) else {
            return Err(AuthError::Unknown);
        };
        if m.len() != 16 || mac != self.mac(user, session) {
            return Err(AuthError::Unknown);
        }
        match self.shard(user).get(&user) {
            Some(a) if a.session == session => Ok(Session { user, session }),
            Some(_) => Err(AuthError::Ended),
            None => Err(AuthError::Unknown),
        }
    }

    /// Runs `f` on the session's account if the session is still the current one.
    fn with_account<T>(
        &self,
        s: Session,
        f: impl FnOnce(&mut Account) -> T,
    ) -> Result<T, AuthError> {
        let mut shard = self.shard(s.user);
        match shard.get_mut(&s.user) {
            // A login between authenticate and here ended the session.
            Some(a) if a.session == s.session => Ok(f(a)),
            Some(_) => Err(AuthError::Ended),
            None => Err(AuthError::Unknown),
        }
    }

    /// Adds `qty` of `product` to the session's cart; returns the units now in the cart.
    pub(crate) fn add_to_cart(
        &self,
        s: Session,
        product: u64,
        qty: u64,
    ) -> Result<Result<u64, CartError>, AuthError> {
        if product == 0 || product > u64::from(PRODUCTS) {
            return Ok(Err(CartError::NoSuchProduct));
        }
        if qty == 0 || qty > u64::from(MAX_QTY) {
            return Ok(Err(CartError::BadQuantity));
        }
        let (product, qty) = (product as u32, qty as u32);
        self.with_account(s, |a| {
            match a.cart.iter_mut().find(|(p, _)| *p == product) {
                Some((_, q)) if *q + qty > MAX_QTY => return Err(CartError::BadQuantity),
                Some((_, q)) => *q += qty,
                None => a.cart.push((product, qty)),
            }
            Ok(cart_units(&a.cart))
        })
    }

    /// Turns a non-empty cart into an order and empties it; `Ok(None)` if the cart is empty.
    pub(crate) fn checkout(&self, s: Session) -> Result<Option<Order>, AuthError> {
        let prices = &self.catalog.prices;
        let next_order = &self.next_order;
        self.with_account(s, |a| {
            if a.cart.is_empty() {
                return None;
            }
            let total_cents = a
                .cart
                .iter()
                .map(|&(p, q)| prices[(p - 1) as usize] * u64::from(q))
                .sum();
            let order = Order {
                order: next_order.fetch_add(1, Relaxed),
                items: cart_units(&a.cart),
                total_cents,
            };
            a.cart.clear();
            a.orders += 1;
            a.spent_cents += total_cents;
            Some(order)
        })
    }

    pub(crate) fn account(&self, s: Session) -> Result<AccountView, AuthError> {
        self.with_account(s, |a| AccountView {
            user: format!("user{}", s.user),
            orders: a.orders,
            spent_cents: a.spent_cents,
            cart_items: cart_units(&a.cart),
        })
    }

    /// The product's JSON, or `None` outside 1..=PRODUCTS.
    pub(crate) fn product(&self, id: u64) -> Option<Bytes> {
        let i = usize::try_from(id.checked_sub(1)?).ok()?;
        self.catalog.product_json.get(i).cloned()
    }

    /// JSON list of at most [`SEARCH_LIMIT`] products whose name contains `q`.
    pub(crate) fn search(&self, q: &str) -> Bytes {
        self.catalog.search(q)
    }
}

fn cart_units(cart: &[(u32, u32)]) -> u64 {
    cart.iter().map(|&(_, q)| u64::from(q)).sum()
}

/// `user42` with prefix `user` → 42; rejects leading zeros so each account has one name.
fn parse_numbered(s: &str, prefix: &str) -> Option<u64> {
    let digits = s.strip_prefix(prefix)?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_checks_names_and_passwords() {
        let shop = Shop::new(10);
        assert!(shop.login("user1", "pass1").is_some());
        assert!(shop.login("user10", "pass10").is_some());
        assert!(shop.login("user11", "pass11").is_none());
        assert!(shop.login("user0", "pass0").is_none());
        assert!(shop.login("user01", "pass1").is_none());
        assert!(shop.login("user2", "pass3").is_none());
        assert!(shop.login("user+2", "pass2").is_none());
        assert!(shop.login("", "").is_none());
    }

    #[test]
    fn newer_login_ends_the_older_session_and_forgeries_are_unknown() {
        let shop = Shop::new(5);
        let a = shop.login("user3", "pass3").unwrap();
        assert!(shop.authenticate(Some(&a)).is_ok());
        let b = shop.login("user3", "pass3").unwrap();
        assert_eq!(shop.authenticate(Some(&a)).unwrap_err(), AuthError::Ended);
        assert!(shop.authenticate(Some(&b)).is_ok());
        let forged = format!("{}f", &b[..b.len() - 1]);
        let forged = if forged == b {
            format!("{}e", &b[..b.len() - 1])
        } else {
            forged
        };
        assert_eq!(
            shop.authenticate(Some(&forged)).unwrap_err(),
            AuthError::Unknown
        );
        assert_eq!(
            shop.authenticate(Some("x")).unwrap_err(),
            AuthError::Unknown
        );
        assert_eq!(shop.authenticate(None).unwrap_err(), AuthError::Missing);
        // A genuine-looking token for an account that never logged in.
        let other = Shop::new(5);
        let t = other.login("user1", "pass1").unwrap();
        assert_eq!(shop.authenticate(Some(&t)).unwrap_err(), AuthError::Unknown);
    }

    #[test]
    fn cart_checkout_and_account() {
        let shop = Shop::new(5);
        let s = shop
            .authenticate(Some(&shop.login("user1", "pass1").unwrap()))
            .unwrap();
        assert_eq!(shop.checkout(s).unwrap().map(|o| o.items), None);
        assert_eq!(shop.add_to_cart(s, 1, 2).unwrap(), Ok(2));
        assert_eq!(shop.add_to_cart(s, 1, 1).unwrap(), Ok(3));
        assert_eq!(
            shop.add_to_cart(s, 1001, 1).unwrap(),
            Err(CartError::NoSuchProduct)
        );
        assert_eq!(
            shop.add_to_cart(s, 2, 0).unwrap(),
            Err(CartError::BadQuantity)
        );
        let order = shop.checkout(s).unwrap().unwrap();
        assert_eq!(order.items, 3);
        assert_eq!(order.total_cents, 3 * 199);
        let view = shop.account(s).unwrap();
        assert_eq!(
            (view.orders, view.cart_items, view.spent_cents),
            (1, 0, 3 * 199)
        );
        assert_eq!(view.user, "user1");
    }

    #[test]
    fn catalogue_and_search() {
        let shop = Shop::new(1);
        assert!(shop.product(0).is_none());
        assert!(shop.product(1001).is_none());
        let p: serde_json::Value = serde_json::from_slice(&shop.product(1000).unwrap()).unwrap();
        assert_eq!(p["id"], 1000);
        for q in ["", "oak", "OAK", "red oak", "zzz", "steel lamp"] {
            let list: Vec<serde_json::Value> = serde_json::from_slice(&shop.search(q)).unwrap();
            assert!(list.len() <= SEARCH_LIMIT, "{q}");
            for item in &list {
                let name = item["name"].as_str().unwrap().to_lowercase();
                assert!(
                    name.contains(q.trim().to_lowercase().as_str()),
                    "{q}: {name}"
                );
            }
            if q == "zzz" {
                assert!(list.is_empty());
            } else {
                assert!(!list.is_empty(), "{q}");
            }
        }
    }
}

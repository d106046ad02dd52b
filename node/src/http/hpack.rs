//! HPACK (RFC 7541) for the HTTP/2 client: decoding the header blocks a server sends
//! (dynamic table, Huffman strings, size updates) and encoding our requests' blocks.
//!
//! Requests are encoded statelessly: static-table indices where the table has the
//! field, literals without indexing otherwise, no Huffman. A request block is then a
//! copy of its bytes and never touches a table: there is nothing to cache per request
//! and no state the server's decoder and ours could disagree on. The decoder bounds
//! what a server can make it do: the table's size is at most the 4096 octets our
//! SETTINGS allow, a decoded list at most the caller's limit, integers at 2^28.
//! This module must not know about frames or connections (`http2` does).

use std::collections::VecDeque;
use std::sync::OnceLock;

/// Our SETTINGS_HEADER_TABLE_SIZE: the protocol's default, so never sent.
pub(super) const TABLE_SIZE: usize = 4096;
/// An integer beyond this is a hostile or broken block (lengths and indices are far
/// smaller).
const MAX_INT: usize = 1 << 28;

/// Why a header block could not be decoded. Each is a connection error
/// (COMPRESSION_ERROR): the table may now differ from the server's.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum HpackError {
    /// The block ended inside a field.
    Truncated,
    /// An integer past `MAX_INT`.
    IntegerTooLarge,
    /// An index beyond the static and dynamic tables (or 0).
    BadIndex(usize),
    /// Huffman data with EOS, or padding that is not up to 7 one bits.
    BadHuffman,
    /// A table size update above our limit, or after the first field.
    BadSizeUpdate(usize),
    /// The decoded list would exceed the caller's bound (names, values, 32 each).
    ListTooLarge(usize),
}

impl std::fmt::Display for HpackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HpackError::Truncated => write!(f, "a header block ends inside a field"),
            HpackError::IntegerTooLarge => write!(f, "a header block has an integer over 2^28"),
            HpackError::BadIndex(i) => write!(f, "a header block refers to table index {i}, which does not exist"),
            HpackError::BadHuffman => write!(f, "a header block has invalid Huffman data"),
            HpackError::BadSizeUpdate(n) => write!(f, "a header block sets its table to {n} octets (at most {TABLE_SIZE}, at the block's start)"),
            HpackError::ListTooLarge(max) => write!(f, "a header list is over {max} bytes"),
        }
    }
}

/// The static table (RFC 7541 Appendix A); index 1 is the first entry.
const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// Huffman codes of the 256 octets (RFC 7541 Appendix B), right-aligned; EOS is
/// thirty 1 bits.
const CODES: [u32; 256] = [
    0x1ff8, 0x7fffd8, 0xfffffe2, 0xfffffe3, 0xfffffe4, 0xfffffe5, 0xfffffe6, 0xfffffe7, 0xfffffe8,
    0xffffea, 0x3ffffffc, 0xfffffe9, 0xfffffea, 0x3ffffffd, 0xfffffeb, 0xfffffec, 0xfffffed,
    0xfffffee, 0xfffffef, 0xffffff0, 0xffffff1, 0xffffff2, 0x3ffffffe, 0xffffff3, 0xffffff4,
    0xffffff5, 0xffffff6, 0xffffff7, 0xffffff8, 0xffffff9, 0xffffffa, 0xffffffb, 0x14, 0x3f8,
    0x3f9, 0xffa, 0x1ff9, 0x15, 0xf8, 0x7fa, 0x3fa, 0x3fb, 0xf9, 0x7fb, 0xfa, 0x16, 0x17, 0x18,
    0x0, 0x1, 0x2, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, 0x5c, 0xfb, 0x7ffc, 0x20, 0xffb,
    0x3fc, 0x1ffa, 0x21, 0x5d, 0x5e, 0x5f, 0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68,
    0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e, 0x6f, 0x70, 0x71, 0x72, 0xfc, 0x73, 0xfd, 0x1ffb, 0x7fff0,
    0x1ffc, 0x3ffc, 0x22, 0x7ffd, 0x3, 0x23, 0x4, 0x24, 0x5, 0x25, 0x26, 0x27, 0x6, 0x74, 0x75,
    0x28, 0x29, 0x2a, 0x7, 0x2b, 0x76, 0x2c, 0x8, 0x9, 0x2d, 0x77, 0x78, 0x79, 0x7a, 0x7b, 0x7ffe,
    0x7fc, 0x3ffd, 0x1ffd, 0xffffffc, 0xfffe6, 0x3fffd2, 0xfffe7, 0xfffe8, 0x3fffd3, 0x3fffd4,
    0x3fffd5, 0x7fffd9, 0x3fffd6, 0x7fffda, 0x7fffdb, 0x7fffdc, 0x7fffdd, 0x7fffde, 0xffffeb,
    0x7fffdf, 0xffffec, 0xffffed, 0x3fffd7, 0x7fffe0, 0xffffee, 0x7fffe1, 0x7fffe2, 0x7fffe3,
    0x7fffe4, 0x1fffdc, 0x3fffd8, 0x7fffe5, 0x3fffd9, 0x7fffe6, 0x7fffe7, 0xffffef, 0x3fffda,
    0x1fffdd, 0xfffe9, 0x3fffdb, 0x3fffdc, 0x7fffe8, 0x7fffe9, 0x1fffde, 0x7fffea, 0x3fffdd,
    0x3fffde, 0xfffff0, 0x1fffdf, 0x3fffdf, 0x7fffeb, 0x7fffec, 0x1fffe0, 0x1fffe1, 0x3fffe0,
    0x1fffe2, 0x7fffed, 0x3fffe1, 0x7fffee, 0x7fffef, 0xfffea, 0x3fffe2, 0x3fffe3, 0x3fffe4,
    0x7ffff0, 0x3fffe5, 0x3fffe6, 0x7ffff1, 0x3ffffe0, 0x3ffffe1, 0xfffeb, 0x7fff1, 0x3fffe7,
    0x7ffff2, 0x3fffe8, 0x1ffffec, 0x3ffffe2, 0x3ffffe3, 0x3ffffe4, 0x7ffffde, 0x7ffffdf,
    0x3ffffe5, 0xfffff1, 0x1ffffed, 0x7fff2, 0x1fffe3, 0x3ffffe6, 0x7ffffe0, 0x7ffffe1, 0x3ffffe7,
    0x7ffffe2, 0xfffff2, 0x1fffe4, 0x1fffe5, 0x3ffffe8, 0x3ffffe9, 0xffffffd, 0x7ffffe3, 0x7ffffe4,
    0x7ffffe5, 0xfffec, 0xfffff3, 0xfffed, 0x1fffe6, 0x3fffe9, 0x1fffe7, 0x1fffe8, 0x7ffff3,
    0x3fffea, 0x3fffeb, 0x1ffffee, 0x1ffffef, 0xfffff4, 0xfffff5, 0x3ffffea, 0x7ffff4, 0x3ffffeb,
    0x7ffffe6, 0x3ffffec, 0x3ffffed, 0x7ffffe7, 0x7ffffe8, 0x7ffffe9, 0x7ffffea, 0x7ffffeb,
    0xffffffe, 0x7ffffec, 0x7ffffed, 0x7ffffee, 0x7ffffef, 0x7fffff0, 0x3ffffee,
];

/// Bit lengths of `CODES`.
const CODE_LENGTHS: [u8; 256] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
];

/// One entry of the dynamic table: its name and value, stored one after the other in
/// `Decoder::bytes` from `at`.
#[derive(Clone, Copy)]
struct Entry {
    at: usize,
    name: u32,
    value: u32,
}

/// The decoding side of one connection: its dynamic table and scratch space.
pub(super) struct Decoder {
    /// Newest entry last. Entries' bytes are appended to `bytes` and dropped from its
    /// front in bulk (`compact`), so an insertion allocates nothing once warm: servers
    /// like nginx insert several fields into the table with every response.
    entries: VecDeque<Entry>,
    bytes: Vec<u8>,
    /// Sum of the entries' sizes (name + value + 32 each).
    size: usize,
    max_size: usize,
    name: Vec<u8>,
    value: Vec<u8>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            entries: VecDeque::new(),
            bytes: Vec::new(),
            size: 0,
            max_size: TABLE_SIZE,
            name: Vec::new(),
            value: Vec::new(),
        }
    }
}

/// Where a field's name or value is while it is handed over.
enum Src {
    Static(&'static [u8]),
    Entry(usize, usize),
    Input(usize, usize),
    Name,
    Value,
}

impl Decoder {
    /// Decodes one complete header block, handing each field to `field` in order.
    /// `max_list` bounds the decoded list as SETTINGS_MAX_HEADER_LIST_SIZE does.
    pub fn decode(
        &mut self,
        block: &[u8],
        max_list: usize,
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let mut pos = 0;
        let mut list = 0usize;
        let mut first = true;
        while pos < block.len() {
            let b = block[pos];
            if b & 0x80 != 0 {
                let index = int(block, &mut pos, 7)?;
                let (name, value) = self.lookup(index)?;
                let (n, v) = (self.get(&name, block), self.get(&value, block));
                list += n.len() + v.len() + 32;
                if list > max_list {
                    return Err(HpackError::ListTooLarge(max_list));
                }
                field(n, v);
            } else if b & 0xe0 == 0x20 {
                let size = int(block, &mut pos, 5)?;
                if !first || size > TABLE_SIZE {
                    return Err(HpackError::BadSizeUpdate(size));
                }
                self.max_size = size;
                self.evict(0);
                continue;
            } else {
                // A literal: with incremental indexing (01), without (0000) or never
                // indexed (0001); its name is an index or a string.
                let (indexing, prefix) = if b & 0xc0 == 0x40 {
                    (true, 6)
                } else {
                    (false, 4)
                };
                let index = int(block, &mut pos, prefix)?;
                let name = if index == 0 {
                    self.string(block, &mut pos, true)?
                } else {
                    match self.lookup(index)?.0 {
                        // The insertion below may evict the very entry named.
                        Src::Entry(at, len) if indexing => {
                            self.name.clear();
                            self.name.extend_from_slice(&self.bytes[at..at + len]);
                            Src::Name
                        }
                        other => other,
                    }
                };
                let value = self.string(block, &mut pos, false)?;
                let (n, v) = (self.get(&name, block), self.get(&value, block));
                list += n.len() + v.len() + 32;
                if list > max_list {
                    return Err(HpackError::ListTooLarge(max_list));
                }
                field(n, v);
                if indexing {
                    let (nl, vl) = (n.len(), v.len());
                    self.insert(&name, &value, block, nl, vl);
                }
            }
            first = false;
        }
        Ok(())
    }

    fn get<'a>(&'a self, src: &Src, block: &'a [u8]) -> &'a [u8] {
        match *src {
            Src::Static(s) => s,
            Src::Entry(at, len) => &self.bytes[at..at + len],
            Src::Input(at, len) => &block[at..at + len],
            Src::Name => &self.name,
            Src::Value => &self.value,
        }
    }

    /// The name and value of table index `index` (1-based, static first).
    fn lookup(&self, index: usize) -> Result<(Src, Src), HpackError> {
        if (1..=STATIC.len()).contains(&index) {
            let (n, v) = STATIC[index - 1];
            return Ok((Src::Static(n), Src::Static(v)));
        }
        let i = index.wrapping_sub(STATIC.len() + 1);
        let len = self.entries.len();
        if index == 0 || i >= len {
            return Err(HpackError::BadIndex(index));
        }
        let e = self.entries[len - 1 - i];
        Ok((
            Src::Entry(e.at, e.name as usize),
            Src::Entry(e.at + e.name as usize, e.value as usize),
        ))
    }

    /// A string literal at `pos`: raw bytes stay in the block, Huffman ones are decoded
    /// into the name or value scratch buffer.
    fn string(&mut self, block: &[u8], pos: &mut usize, is_name: bool) -> Result<Src, HpackError> {
        let huffman = block.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
        let len = int(block, pos, 7)?;
        let at = *pos;
        if len > block.len() - at {
            return Err(HpackError::Truncated);
        }
        *pos += len;
        if !huffman {
            return Ok(Src::Input(at, len));
        }
        let out = if is_name {
            &mut self.name
        } else {
            &mut self.value
        };
        out.clear();
        huffman_decode(&block[at..at + len], out)?;
        Ok(if is_name { Src::Name } else { Src::Value })
    }

    fn insert(&mut self, name: &Src, value: &Src, block: &[u8], nl: usize, vl: usize) {
        let size = nl + vl + 32;
        if size > self.max_size {
            // Too big for the table: it empties it (RFC 7541 §4.4).
            self.evict(self.max_size);
            return;
        }
        self.evict(self.max_size - size);
        if self.bytes.len() > 4 * TABLE_SIZE {
            self.compact();
        }
        let at = self.bytes.len();
        // `name` and `value` are not entries (see `decode`), so `bytes` may grow.
        for src in [name, value] {
            match *src {
                Src::Static(s) => self.bytes.extend_from_slice(s),
                Src::Input(a, l) => self.bytes.extend_from_slice(&block[a..a + l]),
                Src::Name => self.bytes.extend_from_slice(&self.name),
                Src::Value => self.bytes.extend_from_slice(&self.value),
                Src::Entry(a, l) => self.bytes.extend_from_within(a..a + l),
            }
        }
        self.entries.push_back(Entry {
            at,
            name: nl as u32,
            value: vl as u32,
        });
        self.size += size;
    }

    /// Drops the oldest entries until the table holds at most `room` octets.
    fn evict(&mut self, room: usize) {
        let room = room.min(self.max_size);
        while self.size > room {
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            self.size -= e.name as usize + e.value as usize + 32;
        }
        if self.entries.is_empty() {
            self.bytes.clear();
        }
    }

    /// Moves the live entries' bytes to the front of `bytes`.
    fn compact(&mut self) {
        let Some(start) = self.entries.front().map(|e| e.at) else {
            self.bytes.clear();
            return;
        };
        self.bytes.drain(..start);
        for e in &mut self.entries {
            e.at -= start;
        }
    }
}

/// An integer with an `n`-bit prefix (RFC 7541 §5.1) at `pos`.
fn int(block: &[u8], pos: &mut usize, n: u32) -> Result<usize, HpackError> {
    let max = (1usize << n) - 1;
    let first = *block.get(*pos).ok_or(HpackError::Truncated)? as usize & max;
    *pos += 1;
    if first < max {
        return Ok(first);
    }
    let mut v = max;
    let mut shift = 0;
    loop {
        let b = *block.get(*pos).ok_or(HpackError::Truncated)? as usize;
        *pos += 1;
        v += (b & 0x7f) << shift;
        if v > MAX_INT {
            return Err(HpackError::IntegerTooLarge);
        }
        if b & 0x80 == 0 {
            return Ok(v);
        }
        shift += 7;
    }
}

/// Appends an integer with an `n`-bit prefix; `high` holds the first byte's other bits.
fn put_int(out: &mut Vec<u8>, v: usize, n: u32, high: u8) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(high | v as u8);
        return;
    }
    out.push(high | max as u8);
    let mut v = v - max;
    while v >= 128 {
        out.push((v & 0x7f) as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    put_int(out, s.len(), 7, 0);
    out.extend_from_slice(s);
}

/// Appends a field as a literal without indexing: its name by static index when the
/// static table has it (`name_index`), else as a string.
pub(super) fn encode_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    match static_name(name) {
        Some(i) => put_int(out, i, 4, 0),
        None => {
            out.push(0);
            put_string(out, name);
        }
    }
    put_string(out, value);
}

/// A field that is exactly a static entry (`:method: GET` and the like) as its index.
pub(super) fn encode_indexed(out: &mut Vec<u8>, index: usize) {
    put_int(out, index, 7, 0x80);
}

/// The static index of a request field's name, for the names requests commonly carry.
fn static_name(name: &[u8]) -> Option<usize> {
    Some(match name {
        b":authority" => 1,
        b":method" => 2,
        b":path" => 4,
        b":scheme" => 6,
        b"accept-encoding" => 16,
        b"accept-language" => 17,
        b"accept" => 19,
        b"authorization" => 23,
        b"cache-control" => 24,
        b"content-length" => 28,
        b"content-type" => 31,
        b"cookie" => 32,
        b"if-none-match" => 41,
        b"referer" => 51,
        b"user-agent" => 58,
        _ => return None,
    })
}

/// Canonical-code tables for decoding, built once from `CODES`.
struct Huffman {
    /// By the next 8 bits: `len << 8 | symbol` of a code of at most 8 bits, or 0.
    fast: [u16; 256],
    /// By code length: the first code, how many codes, where their symbols start in
    /// `symbols`.
    first: [u32; 31],
    count: [u32; 31],
    offset: [u32; 31],
    /// Symbols (256 is EOS) by code length, then code.
    symbols: Vec<u16>,
}

fn huffman() -> &'static Huffman {
    static TABLE: OnceLock<Huffman> = OnceLock::new();
    TABLE.get_or_init(|| {
        let code = |s: usize| {
            if s == 256 {
                (0x3fff_ffff, 30)
            } else {
                (CODES[s], CODE_LENGTHS[s] as usize)
            }
        };
        let mut by_len: Vec<usize> = (0..=256).collect();
        by_len.sort_by_key(|&s| (code(s).1, code(s).0));
        let mut h = Huffman {
            fast: [0; 256],
            first: [0; 31],
            count: [0; 31],
            offset: [0; 31],
            symbols: by_len.iter().map(|&s| s as u16).collect(),
        };
        for (i, &s) in by_len.iter().enumerate() {
            let (c, len) = code(s);
            if h.count[len] == 0 {
                h.first[len] = c;
                h.offset[len] = i as u32;
            }
            h.count[len] += 1;
            if len <= 8 {
                let shift = 8 - len;
                for low in 0..(1usize << shift) {
                    h.fast[((c as usize) << shift) | low] = ((len as u16) << 8) | s as u16;
                }
            }
        }
        h
    })
}

/// Decodes Huffman-coded `src` (RFC 7541 §5.2) onto `out`. The code is canonical
/// (codes of one length are consecutive, a test checks it), so a code is found by
/// comparing the next bits against each length's range.
pub(super) fn huffman_decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let h = huffman();
    // The next `bits` bits, left-aligned.
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    let mut i = 0;
    loop {
        while bits <= 56 && i < src.len() {
            acc |= (src[i] as u64) << (56 - bits);
            bits += 8;
            i += 1;
        }
        if bits == 0 {
            return Ok(());
        }
        let e = h.fast[(acc >> 56) as usize];
        let (sym, len) = if e != 0 {
            ((e & 0xff) as usize, (e >> 8) as u32)
        } else {
            let mut found = None;
            for len in 9..=30u32 {
                let v = (acc >> (64 - len)) as u32;
                let k = v.wrapping_sub(h.first[len as usize]);
                if k < h.count[len as usize] {
                    found = Some((
                        h.symbols[(h.offset[len as usize] + k) as usize] as usize,
                        len,
                    ));
                    break;
                }
            }
            found.ok_or(HpackError::BadHuffman)?
        };
        if len > bits {
            // The end: up to 7 bits of EOS's prefix (all ones) pad the last octet.
            let pad = (acc >> (64 - bits)) as u32;
            return if bits < 8 && pad == (1 << bits) - 1 {
                Ok(())
            } else {
                Err(HpackError::BadHuffman)
            };
        }
        if sym == 256 {
            return Err(HpackError::BadHuffman);
        }
        out.push(sym as u8);
        acc <<= len;
        bits -= len;
    }
}

/// Huffman-codes `src` (for tests: our requests are sent raw).
#[cfg(test)]
fn huffman_encode(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u64, 0u32);
    for &b in src {
        let (c, len) = (CODES[b as usize] as u64, CODE_LENGTHS[b as usize] as u32);
        acc = (acc << len) | c;
        bits += len;
        while bits >= 8 {
            out.push((acc >> (bits - 8)) as u8);
            bits -= 8;
        }
    }
    if bits > 0 {
        out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(d: &mut Decoder, block: &[u8]) -> Result<Vec<(String, String)>, HpackError> {
        let mut out = Vec::new();
        d.decode(block, 1 << 16, |n, v| {
            out.push((
                String::from_utf8_lossy(n).into(),
                String::from_utf8_lossy(v).into(),
            ))
        })?;
        Ok(out)
    }

    fn table(d: &Decoder) -> Vec<(String, String)> {
        d.entries
            .iter()
            .rev()
            .map(|e| {
                let n = &d.bytes[e.at..e.at + e.name as usize];
                let v = &d.bytes[e.at + e.name as usize..e.at + (e.name + e.value) as usize];
                (
                    String::from_utf8_lossy(n).into(),
                    String::from_utf8_lossy(v).into(),
                )
            })
            .collect()
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn rfc7541_c4_requests_with_huffman() {
        let mut d = Decoder::default();
        let first = decode_all(&mut d, &hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff")).unwrap();
        assert_eq!(
            first,
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        assert_eq!(d.size, 57);
        let second = decode_all(&mut d, &hex("8286 84be 5886 a8eb 1064 9cbf")).unwrap();
        assert_eq!(second[4], ("cache-control".into(), "no-cache".into()));
        assert_eq!(second[3], (":authority".into(), "www.example.com".into()));
        let third = decode_all(
            &mut d,
            &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
        )
        .unwrap();
        assert_eq!(
            third,
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ])
        );
        assert_eq!(
            table(&d),
            pairs(&[
                ("custom-key", "custom-value"),
                ("cache-control", "no-cache"),
                (":authority", "www.example.com")
            ])
        );
        assert_eq!(d.size, 164);
    }

    #[test]
    fn rfc7541_c6_responses_with_huffman_and_eviction() {
        // The example's table holds 256 octets.
        let mut d = Decoder {
            max_size: 256,
            ..Decoder::default()
        };
        let first = decode_all(
            &mut d,
            &hex("4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3"),
        )
        .unwrap();
        assert_eq!(
            first,
            pairs(&[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com"),
            ])
        );
        assert_eq!(d.size, 222);
        let second = decode_all(&mut d, &hex("4883 640e ffc1 c0bf")).unwrap();
        assert_eq!(second[0], (":status".into(), "307".into()));
        assert_eq!(
            second[3],
            ("location".into(), "https://www.example.com".into())
        );
        let third = decode_all(
            &mut d,
            &hex("88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07"),
        )
        .unwrap();
        assert_eq!(
            third,
            pairs(&[
                (":status", "200"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
                ("location", "https://www.example.com"),
                ("content-encoding", "gzip"),
                (
                    "set-cookie",
                    "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
                ),
            ])
        );
        assert_eq!(
            table(&d),
            pairs(&[
                (
                    "set-cookie",
                    "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
                ),
                ("content-encoding", "gzip"),
                ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
            ])
        );
        assert_eq!(d.size, 215);
    }

    #[test]
    fn the_code_is_canonical_and_every_octet_round_trips() {
        // Codes of one length are consecutive and follow the shorter ones'
        // (what `huffman_decode`'s range test relies on).
        let h = huffman();
        let mut next = 0u32;
        for len in 1..=30usize {
            next <<= 1;
            if h.count[len] > 0 {
                assert_eq!(h.first[len], next, "length {len}");
                next += h.count[len];
            }
        }
        let all: Vec<u8> = (0..=255).collect();
        for chunk in [&all[..], b"www.example.com", b"", b"a"] {
            let mut out = Vec::new();
            huffman_decode(&huffman_encode(chunk), &mut out).unwrap();
            assert_eq!(out, chunk);
        }
        for b in 0..=255u8 {
            let mut out = Vec::new();
            huffman_decode(&huffman_encode(&[b, b, b]), &mut out).unwrap();
            assert_eq!(out, [b, b, b]);
        }
    }

    #[test]
    fn bad_huffman_is_refused() {
        let mut out = Vec::new();
        // EOS itself (30 one bits) inside the data.
        assert_eq!(
            huffman_decode(&[0xff, 0xff, 0xff, 0xff], &mut out),
            Err(HpackError::BadHuffman)
        );
        // Padding of zeros: 'a' is 00011, then 000 must be 111.
        assert_eq!(
            huffman_decode(&[0b0001_1000], &mut out),
            Err(HpackError::BadHuffman)
        );
        // A whole octet of padding.
        out.clear();
        assert_eq!(
            huffman_decode(&[0b0001_1111, 0xff], &mut out),
            Err(HpackError::BadHuffman)
        );
    }

    #[test]
    fn hostile_blocks_are_errors_not_panics() {
        let mut d = Decoder::default();
        assert_eq!(decode_all(&mut d, &[0xbe]), Err(HpackError::BadIndex(62)));
        assert_eq!(decode_all(&mut d, &[0x80]), Err(HpackError::BadIndex(0)));
        assert_eq!(
            decode_all(&mut d, &[0x00, 0x05, b'a']),
            Err(HpackError::Truncated)
        );
        assert_eq!(decode_all(&mut d, &[0x40]), Err(HpackError::Truncated));
        assert_eq!(
            decode_all(&mut d, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            Err(HpackError::IntegerTooLarge)
        );
        // A size update above our 4096 octets, and one after a field.
        assert_eq!(
            decode_all(&mut d, &[0x3f, 0xe2, 0x1f]),
            Err(HpackError::BadSizeUpdate(4097))
        );
        assert_eq!(
            decode_all(&mut d, &[0x88, 0x20]),
            Err(HpackError::BadSizeUpdate(0))
        );
        // A list over the caller's bound, by repeating one indexed field.
        let mut block = vec![0x40, 0x01, b'x', 0x7f, 0xe9, 0x06];
        block.extend(std::iter::repeat_n(b'v', 1000));
        block.extend(std::iter::repeat_n(0xbe, 100));
        let mut d = Decoder::default();
        assert_eq!(
            d.decode(&block, 64 * 1024, |_, _| {}),
            Err(HpackError::ListTooLarge(64 * 1024))
        );
    }

    #[test]
    fn an_insert_naming_an_entry_it_evicts_keeps_the_name() {
        // Table of 60 octets holding "n: v" (34); a literal indexing name 62 (that
        // entry) with a 20-octet value must evict it to fit.
        let mut d = Decoder {
            max_size: 60,
            ..Decoder::default()
        };
        decode_all(&mut d, &[0x40, 0x01, b'n', 0x01, b'v']).unwrap();
        let mut block = vec![0x7e, 20];
        block.extend_from_slice(&[b'w'; 20]);
        let got = decode_all(&mut d, &block).unwrap();
        assert_eq!(got, pairs(&[("n", "wwwwwwwwwwwwwwwwwwww")]));
        assert_eq!(table(&d), got);
        // Many insertions keep the table's bytes bounded.
        let mut d = Decoder::default();
        for _ in 0..10_000 {
            decode_all(&mut d, &[0x40, 0x01, b'k', 0x02, b'v', b'w']).unwrap();
        }
        assert!(d.bytes.len() <= 5 * TABLE_SIZE);
    }

    #[test]
    fn our_request_fields_decode_back() {
        let mut block = Vec::new();
        encode_indexed(&mut block, 2);
        encode_field(&mut block, b":path", b"/a/b?c=1");
        encode_field(&mut block, b":authority", b"127.0.0.1:8443");
        encode_field(&mut block, b"x-long", &[b'z'; 300]);
        encode_field(&mut block, b"user-agent", b"stampede");
        let got = decode_all(&mut Decoder::default(), &block).unwrap();
        assert_eq!(
            got,
            pairs(&[
                (":method", "GET"),
                (":path", "/a/b?c=1"),
                (":authority", "127.0.0.1:8443"),
                ("x-long", &"z".repeat(300)),
                ("user-agent", "stampede"),
            ])
        );
    }
}

//! How deeply field tables and arrays nest, measured without recursion.
//!
//! `amq-protocol` parses field tables recursively: one nesting level costs a few KiB of
//! stack, so a table nested a few thousand levels deep (a few KB on the wire, small enough
//! for a pre-authentication `connection.start-ok`) overflows a task's stack and aborts
//! the process. Every frame that carries a field table (the methods listed in
//! [`method_tables_ok`] and a content header's `headers`) is scanned here first, with an
//! explicit stack, and refused when it nests deeper than [`MAX_NESTING`].
//!
//! The scan reads the same grammar `amq-protocol` does (its type octets, RabbitMQ's
//! variant) in the same byte order. Where the input is malformed the scan stops and lets
//! `amq-protocol` report the error: it reads in the same order, so it fails at that
//! point too, before it can recurse past it.

/// The deepest nesting of field tables and arrays accepted (a table at the top is level
/// 1). Real clients use 2 to 4 levels (`capabilities` inside client properties, RabbitMQ's
/// `x-death`: an array of tables holding arrays); 32 leaves room and keeps the recursive
/// parser far from the end of any stack.
pub const MAX_NESTING: usize = 32;

/// A field table or array nests deeper than [`MAX_NESTING`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooDeep;

#[derive(Clone, Copy)]
enum Kind {
    Table,
    Array,
}

/// A byte cursor that answers `None` past the end of its slice.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn skip(&mut self, n: usize, end: usize) -> Option<()> {
        let to = self.pos.checked_add(n)?;
        (to <= end).then(|| self.pos = to)
    }

    fn u8(&mut self, end: usize) -> Option<u8> {
        let b = *self.buf.get(self.pos).filter(|_| self.pos < end)?;
        self.pos += 1;
        Some(b)
    }

    fn u32(&mut self, end: usize) -> Option<usize> {
        let at = self.pos;
        self.skip(4, end)?;
        let b = &self.buf[at..at + 4];
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn short_string(&mut self, end: usize) -> Option<()> {
        let n = self.u8(end)? as usize;
        self.skip(n, end)
    }
}

/// Check the field table that starts at `buf` (with its 4-byte length). `Err` only when
/// it nests deeper than `max`; malformed input is `Ok` (the parser refuses it).
pub fn table_ok(buf: &[u8], max: usize) -> Result<(), TooDeep> {
    let mut c = Cursor { buf, pos: 0 };
    match scan(&mut c, max) {
        Some(Err(e)) => Err(e),
        _ => Ok(()),
    }
}

/// `None`: malformed (stop and let the parser say so).
fn scan(c: &mut Cursor<'_>, max: usize) -> Option<Result<(), TooDeep>> {
    let len = c.u32(c.buf.len())?;
    let end = c.pos.checked_add(len).filter(|e| *e <= c.buf.len())?;
    let mut stack: Vec<(usize, Kind)> = vec![(end, Kind::Table)];
    if max == 0 {
        return Some(Err(TooDeep));
    }
    while let Some(&(end, kind)) = stack.last() {
        if c.pos == end {
            stack.pop();
            continue;
        }
        if let Kind::Table = kind {
            c.short_string(end)?;
        }
        let size = match c.u8(end)? {
            b'V' => 0,
            b't' | b'b' | b'B' => 1,
            b's' | b'U' | b'u' => 2,
            b'I' | b'i' | b'f' => 4,
            b'D' => 5,
            b'L' | b'l' | b'd' | b'T' => 8,
            b'S' | b'x' => c.u32(end)?,
            ty @ (b'A' | b'F') => {
                let len = c.u32(end)?;
                let inner = c.pos.checked_add(len).filter(|e| *e <= end)?;
                if stack.len() >= max {
                    return Some(Err(TooDeep));
                }
                let kind = if ty == b'F' { Kind::Table } else { Kind::Array };
                stack.push((inner, kind));
                continue;
            }
            _ => return None,
        };
        c.skip(size, end)?;
    }
    Some(Ok(()))
}

/// Check the field table a method payload (class and method ids first) carries, for
/// every method that has one. Other methods are `Ok`.
pub fn method_tables_ok(payload: &[u8], max: usize) -> Result<(), TooDeep> {
    if payload.len() < 4 {
        return Ok(());
    }
    let class = u16::from_be_bytes([payload[0], payload[1]]);
    let method = u16::from_be_bytes([payload[2], payload[3]]);
    // What precedes the table: (fixed bytes, short strings, then a flags octet or not).
    let (fixed, shorts, flags) = match (class, method) {
        (10, 10) => (2, 0, false), // connection.start: version major, minor
        (10, 11) => (0, 0, false), // connection.start-ok: client-properties
        (40, 10) => (2, 2, true),  // exchange.declare: exchange, type
        (40, 30) | (40, 40) => (2, 3, true), // exchange.bind/unbind: dest, source, key
        (50, 10) => (2, 1, true),  // queue.declare: queue
        (50, 20) => (2, 3, true),  // queue.bind: queue, exchange, key
        (50, 50) => (2, 3, false), // queue.unbind: queue, exchange, key
        (60, 20) => (2, 2, true),  // basic.consume: queue, consumer tag
        _ => return Ok(()),
    };
    let mut c = Cursor {
        buf: payload,
        pos: 4,
    };
    let end = payload.len();
    let found = (|| {
        c.skip(fixed, end)?;
        for _ in 0..shorts {
            c.short_string(end)?;
        }
        if flags {
            c.skip(1, end)?;
        }
        Some(c.pos)
    })();
    match found {
        Some(at) => table_ok(&payload[at..], max),
        None => Ok(()),
    }
}

/// Check the `headers` table of content-header property bytes (flags first).
pub fn properties_ok(raw: &[u8], max: usize) -> Result<(), TooDeep> {
    let end = raw.len();
    let mut c = Cursor { buf: raw, pos: 0 };
    let found = (|| {
        let hi = c.u8(end)?;
        c.skip(1, end)?;
        if hi & 0x80 != 0 {
            c.short_string(end)?; // content-type
        }
        if hi & 0x40 != 0 {
            c.short_string(end)?; // content-encoding
        }
        (hi & 0x20 != 0).then_some(c.pos)
    })();
    match found {
        Some(at) => table_ok(&raw[at..], max),
        None => Ok(()),
    }
}

/// A field table (with its length) nested `depth` levels deep: a table inside a table
/// ..., or with `arrays` arrays between (the outermost is always a table). For tests and
/// fuzz targets.
pub fn nested(depth: usize, arrays: bool) -> Vec<u8> {
    // Every level's bytes come before the levels inside it: work the sizes out inside
    // out, then write outside in (linear, however deep).
    let in_array = |level: usize| arrays && level < depth;
    // sizes[l]: bytes of the value at level l (1: the innermost empty table, 4 bytes).
    let mut sizes = vec![0, 4];
    for level in 2..=depth {
        let inner = sizes[level - 1];
        sizes.push(if in_array(level) {
            4 + 1 + inner
        } else {
            4 + 3 + inner
        });
    }
    let mut out = Vec::with_capacity(sizes[depth.max(1)]);
    for level in (2..=depth).rev() {
        out.extend_from_slice(&((sizes[level] - 4) as u32).to_be_bytes());
        if !in_array(level) {
            out.extend_from_slice(&[1, b'k']);
        }
        // The type of the value inside: an array where that level is one.
        out.push(if level > 2 && in_array(level - 1) {
            b'A'
        } else {
            b'F'
        });
    }
    out.extend_from_slice(&0u32.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_is_counted_and_limited() {
        for d in [1, 2, 5, 32] {
            assert_eq!(table_ok(&nested(d, false), 32), Ok(()), "depth {d}");
        }
        assert_eq!(table_ok(&nested(33, false), 32), Err(TooDeep));
        assert_eq!(table_ok(&nested(3_000, false), 32), Err(TooDeep));
        assert_eq!(table_ok(&nested(33, true), 32), Err(TooDeep));
        assert_eq!(table_ok(&nested(20, true), 32), Ok(()));
    }

    #[test]
    fn malformed_is_left_to_the_parser() {
        assert_eq!(table_ok(&[0, 0, 0, 9, 1, b'k'], 4), Ok(()));
        assert_eq!(table_ok(&[0, 0, 0, 3, 1, b'k', b'?'], 4), Ok(()));
        assert_eq!(table_ok(&[], 4), Ok(()));
    }

    #[test]
    fn scalar_values_are_skipped() {
        let mut body = Vec::new();
        for (ty, n) in [(b't', 1), (b's', 2), (b'I', 4), (b'D', 5), (b'l', 8)] {
            body.extend_from_slice(&[1, b'a', ty]);
            body.extend(std::iter::repeat_n(0u8, n));
        }
        body.extend_from_slice(&[1, b'b', b'S', 0, 0, 0, 2, b'h', b'i', 1, b'c', b'V']);
        let mut t = (body.len() as u32).to_be_bytes().to_vec();
        t.extend_from_slice(&body);
        assert_eq!(table_ok(&t, 1), Ok(()));
    }
}

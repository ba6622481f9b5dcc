//! A small JSON reader (the crate has no JSON library) for `sluice stats --json` and `/api/users`.

/// A JSON value; objects keep their keys in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// Parses one JSON text (surrounding whitespace allowed).
    pub fn parse(s: &str) -> Result<Json, String> {
        let mut p = JsonParser { s, i: 0 };
        let v = p.value()?;
        p.ws();
        if p.i != s.len() {
            return Err(format!("trailing text at byte {}", p.i));
        }
        Ok(v)
    }

    /// A member of an object.
    pub fn get(&self, k: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.iter().find(|(n, _)| n == k).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The elements of an array (none for anything else).
    pub fn as_array(&self) -> &[Json] {
        match self {
            Json::Arr(v) => v,
            _ => &[],
        }
    }

    /// A numeric member; panics (failing the test) if it is missing or not a number.
    pub fn num(&self, k: &str) -> f64 {
        match self.get(k) {
            Some(Json::Num(n)) => *n,
            other => panic!("{k} is not a number but {other:?} in {self:?}"),
        }
    }
}

struct JsonParser<'a> {
    s: &'a str,
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        let rest = &self.s[self.i..];
        self.i += rest.len() - rest.trim_start_matches([' ', '\t', '\n', '\r']).len();
    }

    fn peek(&self) -> Option<char> {
        self.s[self.i..].chars().next()
    }

    fn bump(&mut self) -> Result<char, String> {
        let c = self.peek().ok_or("unexpected end")?;
        self.i += c.len_utf8();
        Ok(c)
    }

    fn expect(&mut self, want: char) -> Result<(), String> {
        match self.bump()? {
            c if c == want => Ok(()),
            c => Err(format!("expected {want:?}, found {c:?} at byte {}", self.i)),
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.peek().ok_or("unexpected end")? {
            '{' => self.object(),
            '[' => self.array(),
            '"' => self.string().map(Json::Str),
            '-' | '0'..='9' => self.number(),
            _ => {
                for (word, v) in [
                    ("true", Json::Bool(true)),
                    ("false", Json::Bool(false)),
                    ("null", Json::Null),
                ] {
                    if self.s[self.i..].starts_with(word) {
                        self.i += word.len();
                        return Ok(v);
                    }
                }
                Err(format!("unexpected text at byte {}", self.i))
            }
        }
    }

    fn object(&mut self) -> Result<Json, String> {
        self.expect('{')?;
        let mut m = Vec::new();
        self.ws();
        if self.peek() == Some('}') {
            self.i += 1;
            return Ok(Json::Obj(m));
        }
        loop {
            self.ws();
            let k = self.string()?;
            self.ws();
            self.expect(':')?;
            m.push((k, self.value()?));
            self.ws();
            match self.bump()? {
                ',' => {}
                '}' => return Ok(Json::Obj(m)),
                c => return Err(format!("expected , or }} in an object, found {c:?}")),
            }
        }
    }

    fn array(&mut self) -> Result<Json, String> {
        self.expect('[')?;
        let mut v = Vec::new();
        self.ws();
        if self.peek() == Some(']') {
            self.i += 1;
            return Ok(Json::Arr(v));
        }
        loop {
            v.push(self.value()?);
            self.ws();
            match self.bump()? {
                ',' => {}
                ']' => return Ok(Json::Arr(v)),
                c => return Err(format!("expected , or ] in an array, found {c:?}")),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let h = self.s.get(self.i..self.i + 4).ok_or("short \\u escape")?;
        self.i += 4;
        u32::from_str_radix(h, 16).map_err(|_| format!("bad \\u escape {h:?}"))
    }

    fn string(&mut self) -> Result<String, String> {
        self.expect('"')?;
        let mut out = String::new();
        loop {
            match self.bump()? {
                '"' => return Ok(out),
                '\\' => {
                    let c = match self.bump()? {
                        '"' => '"',
                        '\\' => '\\',
                        '/' => '/',
                        'b' => '\u{8}',
                        'f' => '\u{c}',
                        'n' => '\n',
                        'r' => '\r',
                        't' => '\t',
                        'u' => {
                            let mut code = self.hex4()?;
                            if (0xD800..0xDC00).contains(&code) {
                                self.expect('\\')?;
                                self.expect('u')?;
                                let low = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&low) {
                                    return Err("unpaired surrogate".into());
                                }
                                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                            }
                            char::from_u32(code).ok_or("bad \\u code point")?
                        }
                        c => return Err(format!("bad escape \\{c}")),
                    };
                    out.push(c);
                }
                c if (c as u32) < 0x20 => return Err("raw control character in a string".into()),
                c => out.push(c),
            }
        }
    }

    fn number(&mut self) -> Result<Json, String> {
        let start = self.i;
        let digits = |p: &mut Self| {
            let n = p.s[p.i..].chars().take_while(char::is_ascii_digit).count();
            p.i += n;
            n
        };
        if self.peek() == Some('-') {
            self.i += 1;
        }
        let int_start = self.i;
        let n = digits(self);
        if n == 0 || (n > 1 && self.s[int_start..].starts_with('0')) {
            return Err(format!("bad number at byte {start}"));
        }
        if self.peek() == Some('.') {
            self.i += 1;
            if digits(self) == 0 {
                return Err(format!("bad fraction at byte {start}"));
            }
        }
        if matches!(self.peek(), Some('e' | 'E')) {
            self.i += 1;
            if matches!(self.peek(), Some('+' | '-')) {
                self.i += 1;
            }
            if digits(self) == 0 {
                return Err(format!("bad exponent at byte {start}"));
            }
        }
        self.s[start..self.i]
            .parse()
            .map(Json::Num)
            .map_err(|e| format!("{e}"))
    }
}

#[test]
fn the_json_reader_reads_what_it_should_and_nothing_else() {
    let v = Json::parse(
        r#" [{"a":-1.5e2,"b":"q\"\\\u00fc\ud83d\ude00","c":[true,false,null],"d":{}}] "#,
    )
    .unwrap();
    let o = &v.as_array()[0];
    assert_eq!(o.num("a"), -150.0);
    assert_eq!(o.get("b").and_then(Json::as_str), Some("q\"\\ü😀"));
    assert_eq!(
        o.get("c"),
        Some(&Json::Arr(vec![
            Json::Bool(true),
            Json::Bool(false),
            Json::Null
        ]))
    );
    for bad in [
        "[1,]",
        "{\"a\" 1}",
        "01",
        "\"\\x\"",
        "[1] 2",
        "\"a\u{1}\"",
        "1.",
        "-",
    ] {
        assert!(Json::parse(bad).is_err(), "accepted {bad:?}");
    }
}

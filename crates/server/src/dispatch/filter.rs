//! The `get_all_records_where` expression language:
//! `expr := value = value | expr and expr | expr or expr | not expr | true | false | ( expr )`,
//! `value := "literal" | field "column"`; `and`/`or` are left-associative
//! with equal precedence; comparison is on the database string form.

use corral_model::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Literal(String),
    Field(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    True,
    False,
    Eq(Operand, Operand),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    Word(String),
    Str(String),
    LParen,
    RParen,
    Eq,
}

pub(crate) fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut it = s.chars().peekable();
    while let Some(&c) = it.peek() {
        match c {
            ' ' | '\t' | '\n' | '\r' => {
                it.next();
            }
            '(' => {
                it.next();
                out.push(Tok::LParen)
            }
            ')' => {
                it.next();
                out.push(Tok::RParen)
            }
            '=' => {
                it.next();
                out.push(Tok::Eq)
            }
            '"' => {
                it.next();
                let mut lit = String::new();
                loop {
                    match it.next() {
                        Some('"') => break,
                        Some(ch) => lit.push(ch),
                        None => return Err("unterminated string literal".into()),
                    }
                }
                out.push(Tok::Str(lit));
            }
            c if c.is_ascii_alphabetic() => {
                let mut w = String::new();
                while let Some(&ch) = it.peek() {
                    if ch.is_ascii_alphanumeric() || ch == '_' {
                        w.push(ch);
                        it.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Word(w));
            }
            other => return Err(format!("unexpected character '{other}'")),
        }
    }
    Ok(out)
}

pub(crate) struct P {
    toks: Vec<Tok>,
    pos: usize,
}

impl P {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn operand(&mut self) -> Result<Operand, String> {
        match self.next() {
            Some(Tok::Str(s)) => Ok(Operand::Literal(s)),
            Some(Tok::Word(w)) if w == "field" => match self.next() {
                Some(Tok::Str(s)) => Ok(Operand::Field(s)),
                _ => Err("expected a column name after field".into()),
            },
            t => Err(format!("expected a value, found {t:?}")),
        }
    }
    fn atom(&mut self, depth: usize) -> Result<Expr, String> {
        if depth > 100 {
            return Err("expression nested too deeply".into());
        }
        match self.peek() {
            Some(Tok::Word(w)) if w == "true" => {
                self.next();
                Ok(Expr::True)
            }
            Some(Tok::Word(w)) if w == "false" => {
                self.next();
                Ok(Expr::False)
            }
            Some(Tok::Word(w)) if w == "not" => {
                self.next();
                Ok(Expr::Not(Box::new(self.atom(depth + 1)?)))
            }
            Some(Tok::LParen) => {
                self.next();
                let e = self.expr(depth + 1)?;
                match self.next() {
                    Some(Tok::RParen) => Ok(e),
                    _ => Err("expected )".into()),
                }
            }
            _ => {
                let a = self.operand()?;
                match self.next() {
                    Some(Tok::Eq) => {}
                    _ => return Err("expected =".into()),
                }
                let b = self.operand()?;
                Ok(Expr::Eq(a, b))
            }
        }
    }
    fn expr(&mut self, depth: usize) -> Result<Expr, String> {
        let mut e = self.atom(depth)?;
        loop {
            match self.peek() {
                Some(Tok::Word(w)) if w == "and" => {
                    self.next();
                    e = Expr::And(Box::new(e), Box::new(self.atom(depth)?));
                }
                Some(Tok::Word(w)) if w == "or" => {
                    self.next();
                    e = Expr::Or(Box::new(e), Box::new(self.atom(depth)?));
                }
                _ => return Ok(e),
            }
        }
    }
}

pub fn parse(s: &str) -> Result<Expr, String> {
    let mut p = P {
        toks: lex(s)?,
        pos: 0,
    };
    let e = p.expr(0)?;
    if p.pos != p.toks.len() {
        return Err("trailing tokens".into());
    }
    Ok(e)
}

impl Expr {
    /// Evaluates against a record (`Value::Struct` of wire field names).
    pub fn eval(&self, rec: &Value) -> bool {
        let val = |o: &Operand| -> String {
            match o {
                Operand::Literal(s) => s.clone(),
                // DB columns join namespaces with `__`; wire names with `_`.
                Operand::Field(f) => rec
                    .member(&f.replace("__", "_"))
                    .map(Value::db_string)
                    .unwrap_or_default(),
            }
        };
        match self {
            Expr::True => true,
            Expr::False => false,
            Expr::Eq(a, b) => val(a) == val(b),
            Expr::And(a, b) => a.eval(rec) && b.eval(rec),
            Expr::Or(a, b) => a.eval(rec) || b.eval(rec),
            Expr::Not(a) => !a.eval(rec),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xe_selector_expressions() {
        let rec = Value::Struct(vec![
            ("uuid".into(), Value::str("u1")),
            ("name_label".into(), Value::str("web")),
            ("is_a_template".into(), Value::Bool(false)),
        ]);
        assert!(parse("true").unwrap().eval(&rec));
        assert!(
            parse(r#"(field "uuid"="web") or (field "name__label"="web")"#)
                .unwrap()
                .eval(&rec)
        );
        assert!(
            parse(r#"field "is_a_template"="false" and not (field "uuid"="x")"#)
                .unwrap()
                .eval(&rec)
        );
        assert!(!parse(r#"field "uuid"="u2""#).unwrap().eval(&rec));
        assert!(parse(r#"field "uuid"="#).is_err());
        assert!(parse(r#"(field "uuid"="a""#).is_err());
    }
}

//! Reading a corpus: plain UTF-8 text (one document) or JSON lines (one per line).

use std::path::Path;

use crate::DataError;

/// The documents of a corpus file. Files ending in `.jsonl` are JSON lines whose objects
/// carry a `text` string; anything else is read as one UTF-8 document.
pub fn load_documents(path: &Path) -> Result<Vec<String>, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_documents(path, &bytes)
}

/// As [`load_documents`], from bytes already read; `path` names the source in errors.
pub fn parse_documents(path: &Path, bytes: &[u8]) -> Result<Vec<String>, DataError> {
    let text = std::str::from_utf8(bytes).map_err(|e| DataError::NotUtf8 {
        path: path.to_owned(),
        offset: e.valid_up_to(),
    })?;
    let is_jsonl = path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "ndjson");
    let docs: Vec<String> = if is_jsonl {
        let mut docs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |message: String| DataError::BadJsonLine {
                path: path.to_owned(),
                line: i + 1,
                message,
            };
            let value: serde_json::Value =
                serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
            match value.get("text") {
                Some(serde_json::Value::String(s)) => docs.push(s.clone()),
                Some(_) => return Err(bad("the \"text\" field is not a string".into())),
                None => return Err(bad("the object has no \"text\" field".into())),
            }
        }
        docs
    } else {
        vec![text.to_owned()]
    };
    if docs.iter().all(|d| d.trim().is_empty()) {
        return Err(DataError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(name: &str, bytes: &[u8], expect: expect_test::Expect) {
        let got = match parse_documents(Path::new(name), bytes) {
            Ok(docs) => format!("{docs:?}"),
            Err(e) => format!("error: {e}"),
        };
        expect.assert_eq(&got);
    }

    #[test]
    fn formats_and_errors() {
        check(
            "a.txt",
            b"To be, or not to be",
            expect_test::expect![[r#"["To be, or not to be"]"#]],
        );
        check(
            "a.jsonl",
            b"{\"text\": \"one\"}\n\n{\"text\": \"two\", \"id\": 2}\n",
            expect_test::expect![[r#"["one", "two"]"#]],
        );
        check(
            "a.jsonl",
            b"{\"text\": \"one\"}\n{\"txt\": 1}\n",
            expect_test::expect![[r#"error: a.jsonl line 2: the object has no "text" field"#]],
        );
        check(
            "a.jsonl",
            b"{\"text\": 5}",
            expect_test::expect![[r#"error: a.jsonl line 1: the "text" field is not a string"#]],
        );
        check(
            "a.jsonl",
            b"{not json",
            expect_test::expect![[
                r#"error: a.jsonl line 1: key must be a string at line 1 column 2"#
            ]],
        );
        check(
            "a.txt",
            b"abc\xff\xfe",
            expect_test::expect![[
                r#"error: a.txt is not UTF-8 text (first bad byte at offset 3); give a UTF-8 text file or JSON lines with a "text" field"#
            ]],
        );
        check(
            "a.txt",
            b"  \n ",
            expect_test::expect![[r#"error: a.txt holds no text"#]],
        );
    }
}

//! The test vectors' file format (docs/vectors/README.md): a JSON object
//! with `title`, `spec`, `notes`, `inputs` and `outputs`. In `inputs` and
//! `outputs`, a key ending in `_hex` holds bytes as lowercase hex, any other
//! string is UTF-8 text, and numbers are integers below 2^53.
//!
//! ```text
//! Topic::inputs() ──► Fields ──Topic::outputs──► Fields ──render──► docs/vectors/<file>
//! docs/vectors/<file> ──parse──► inputs, outputs ──► outputs(inputs) == outputs ?
//! ```

use serde_json::Value;
use std::path::PathBuf;

/// Named values in the order they were put (the order they are written).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fields(Vec<(String, Value)>);

impl Fields {
    fn get(&self, key: &str) -> &Value {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("vector field {key} missing"))
    }

    fn put(&mut self, key: String, v: Value) {
        assert!(
            self.0.iter().all(|(k, _)| *k != key),
            "vector field {key} twice"
        );
        self.0.push((key, v));
    }

    /// The bytes under `<name>_hex`.
    pub fn bytes(&self, name: &str) -> Vec<u8> {
        let key = format!("{name}_hex");
        let text = self
            .get(&key)
            .as_str()
            .unwrap_or_else(|| panic!("{key} is not a string"));
        hex::decode(text).unwrap_or_else(|e| panic!("{key}: {e}"))
    }

    /// The bytes under `<name>_hex`, which must be `N` long.
    pub fn array<const N: usize>(&self, name: &str) -> [u8; N] {
        self.bytes(name)
            .try_into()
            .unwrap_or_else(|b: Vec<u8>| panic!("{name}_hex has {} bytes, not {N}", b.len()))
    }

    pub fn text(&self, name: &str) -> String {
        let v = self.get(name);
        v.as_str()
            .unwrap_or_else(|| panic!("{name} is not text"))
            .to_owned()
    }

    pub fn int(&self, name: &str) -> i64 {
        self.get(name)
            .as_i64()
            .unwrap_or_else(|| panic!("{name} is not an integer"))
    }

    pub fn uint(&self, name: &str) -> u64 {
        u64::try_from(self.int(name)).unwrap_or_else(|_| panic!("{name} is negative"))
    }

    pub fn put_bytes(&mut self, name: &str, v: &[u8]) {
        self.put(format!("{name}_hex"), Value::String(hex::encode(v)));
    }

    pub fn put_text(&mut self, name: &str, v: &str) {
        assert!(!name.ends_with("_hex"), "{name}: text under a hex name");
        self.put(name.to_owned(), Value::String(v.to_owned()));
    }

    pub fn put_int(&mut self, name: &str, v: impl Into<i64>) {
        let v = v.into();
        assert!(
            v.unsigned_abs() < 1 << 53,
            "{name} = {v} is past JSON's exact integers"
        );
        self.put(name.to_owned(), Value::from(v));
    }

    /// Fails naming the first field that differs, in hex where it is bytes.
    pub fn assert_same(&self, expected: &Self, file: &str) {
        for (k, v) in &expected.0 {
            let got = self.0.iter().find(|(g, _)| g == k).map(|(_, g)| g);
            assert!(
                got == Some(v),
                "{file}: output {k} differs\n  file: {v}\n  code: {}",
                got.map_or("(none)".into(), Value::to_string)
            );
        }
        for (k, _) in &self.0 {
            assert!(
                expected.0.iter().any(|(e, _)| e == k),
                "{file}: the code gives output {k}, which the file lacks"
            );
        }
    }

    fn from_json(v: &Value, what: &str) -> Self {
        let map = v
            .as_object()
            .unwrap_or_else(|| panic!("{what} is not an object"));
        Self(map.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    fn render(&self, out: &mut String) {
        out.push_str("{\n");
        for (i, (k, v)) in self.0.iter().enumerate() {
            let sep = if i + 1 < self.0.len() { "," } else { "" };
            out.push_str(&format!("    {}: {v}{sep}\n", Value::String(k.clone())));
        }
        out.push_str("  }");
    }
}

/// One file of vectors.
pub struct Topic {
    pub file: &'static str,
    pub title: &'static str,
    /// Where in docs/PROTOCOL.md the bytes are specified.
    pub spec: &'static str,
    pub notes: &'static [&'static str],
    /// The fixed inputs, and fresh signatures where the topic signs
    /// (ECDSA is randomised: any valid signature will do, so the file keeps
    /// the one made when it was generated).
    pub inputs: fn() -> Fields,
    /// Every output, computed by the code's encoders from the inputs.
    pub outputs: fn(&Fields) -> Fields,
    /// What equal bytes do not show: the code's decoders accept the
    /// outputs, and its verifiers the signatures.
    pub accept: fn(&Fields, &Fields),
}

fn path(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("docs/vectors")
        .join(file)
}

impl Topic {
    /// Checks the committed file against the code.
    pub fn check(&self) {
        let p = path(self.file);
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (regenerate: see docs/vectors/README.md)",
                p.display()
            )
        });
        let doc: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", self.file));
        let notes: Vec<&str> = doc["notes"]
            .as_array()
            .map_or(Vec::new(), |n| n.iter().filter_map(Value::as_str).collect());
        assert!(
            doc["title"] == self.title && doc["spec"] == self.spec && notes == self.notes,
            "{}: title, spec or notes differ from the code's (regenerate)",
            self.file
        );
        let inputs = Fields::from_json(&doc["inputs"], "inputs");
        let outputs = Fields::from_json(&doc["outputs"], "outputs");
        (self.outputs)(&inputs).assert_same(&outputs, self.file);
        (self.accept)(&inputs, &outputs);
    }

    /// Writes the file anew from the code, fresh signatures included.
    pub fn write(&self) {
        let inputs = (self.inputs)();
        let outputs = (self.outputs)(&inputs);
        (self.accept)(&inputs, &outputs);
        let mut out = String::from("{\n");
        let s = |v: &str| Value::String(v.to_owned()).to_string();
        out.push_str(&format!("  \"title\": {},\n", s(self.title)));
        out.push_str(&format!("  \"spec\": {},\n", s(self.spec)));
        out.push_str("  \"notes\": [\n");
        for (i, n) in self.notes.iter().enumerate() {
            let sep = if i + 1 < self.notes.len() { "," } else { "" };
            out.push_str(&format!("    {}{sep}\n", s(n)));
        }
        out.push_str("  ],\n  \"inputs\": ");
        inputs.render(&mut out);
        out.push_str(",\n  \"outputs\": ");
        outputs.render(&mut out);
        out.push_str("\n}\n");
        std::fs::write(path(self.file), out).expect("writing a vector file");
    }
}

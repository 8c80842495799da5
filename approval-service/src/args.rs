//! The flag walker shared by the binary's subcommands (`serve`,
//! `check-config`, `verify-records`, `export-records`).
//!
//! Every flag takes its value as `--flag value` or `--flag=value`; flags
//! without a value (`--no-envoy`) simply never ask for one.

/// Walks `--flag` arguments; ask for the current flag's value with
/// [`Flags::value`].
pub struct Flags<'a> {
    rest: std::slice::Iter<'a, String>,
    flag: &'a str,
    inline: Option<&'a str>,
}

impl<'a> Flags<'a> {
    pub fn new(args: &'a [String]) -> Self {
        Flags {
            rest: args.iter(),
            flag: "",
            inline: None,
        }
    }

    /// The next flag (`--config` also for `--config=FILE`), or any other
    /// argument as it is.
    pub fn next_flag(&mut self) -> Option<&'a str> {
        let arg = self.rest.next()?;
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v)),
            _ => (arg.as_str(), None),
        };
        self.flag = flag;
        self.inline = inline;
        Some(flag)
    }

    /// The current flag's value: the text after `=`, else the next argument.
    pub fn value(&mut self) -> Result<String, String> {
        self.inline
            .map(str::to_string)
            .or_else(|| self.rest.next().cloned())
            .ok_or_else(|| format!("{} needs a value", self.flag))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn both_value_forms_and_missing_values() {
        let args: Vec<String> = ["--a", "1", "--b=2", "plain", "--c"]
            .map(String::from)
            .into();
        let mut f = Flags::new(&args);
        assert_eq!(f.next_flag(), Some("--a"));
        assert_eq!(f.value().unwrap(), "1");
        assert_eq!(f.next_flag(), Some("--b"));
        assert_eq!(f.value().unwrap(), "2");
        assert_eq!(f.next_flag(), Some("plain"));
        assert_eq!(f.next_flag(), Some("--c"));
        assert_eq!(f.value().unwrap_err(), "--c needs a value");
        assert_eq!(f.next_flag(), None);
    }
}

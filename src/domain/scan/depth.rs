//! How deep a JSON body nests, by one pass over its bytes: a body nested
//! deeper than the edge allows is refused before a parser recurses into it.

/// The deepest nesting of arrays and objects, by one pass over the bytes
/// (brackets inside strings do not count).
pub fn json_depth(body: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::json_depth;

    #[test]
    fn depth_ignores_brackets_in_strings() {
        assert_eq!(json_depth(br#"{"a":[1,{"b":"[[[[\"]]"}]}"#), 3);
        assert_eq!(json_depth(b"[[[]]]"), 3);
        assert_eq!(json_depth(b"12"), 0);
    }

    mod props {
        use super::super::json_depth;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn depth_of_nested_arrays_is_counted(n in 0usize..300) {
                let body = format!("{}{}", "[".repeat(n), "]".repeat(n));
                prop_assert_eq!(json_depth(body.as_bytes()), n);
            }

            #[test]
            fn depth_never_panics(body in proptest::collection::vec(any::<u8>(), 0..1024)) {
                let _ = json_depth(&body);
            }
        }
    }
}

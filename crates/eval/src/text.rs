//! ModelScope's `chinese_utils`: `rebuild_chinese_str` (the metric's text preparation) and
//! `remove_space_between_chinese_chars` (the pipeline's decoding), with Python's whitespace
//! rules.

/// ModelScope's `CHINESE_PUNCTUATION` (`modelscope/utils/chinese_utils.py`).
pub const CHINESE_PUNCTUATION: &str = "＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､\u{3000}、〃〈〉《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏﹑﹔·！？｡。";

/// Whether `c` is a CJK ideograph in the ranges ModelScope checks.
pub fn is_chinese_char(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF
        | 0x3400..=0x4DBF
        | 0x20000..=0x2A6DF
        | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F
        | 0x2B820..=0x2CEAF
        | 0xF900..=0xFAFF
        | 0x2F800..=0x2FA1F)
}

/// Whether `c` is in [`CHINESE_PUNCTUATION`].
pub fn is_chinese_punctuation(c: char) -> bool {
    CHINESE_PUNCTUATION.contains(c)
}

/// Python's `str.isspace` for one character: the characters `str.split()` splits on.
pub fn is_py_whitespace(c: char) -> bool {
    // Python counts the information separators U+001C..U+001F as whitespace; Rust does not.
    c.is_whitespace() || matches!(c, '\u{1c}'..='\u{1f}')
}

/// Python's `s.split()` with no argument.
pub fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_py_whitespace).filter(|w| !w.is_empty())
}

/// Python's `s.strip()` with no argument.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_whitespace)
}

/// Puts spaces around every CJK character and Chinese punctuation mark, then collapses
/// whitespace: Chinese becomes one token per character, Latin words and numbers stay whole.
pub fn rebuild_chinese_str(s: &str) -> String {
    let mut spaced = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if is_chinese_char(c) || is_chinese_punctuation(c) {
            spaced.push(' ');
            spaced.push(c);
            spaced.push(' ');
        } else {
            spaced.push(c);
        }
    }
    let mut out = String::with_capacity(spaced.len());
    for (i, w) in py_split(&spaced).enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(w);
    }
    out
}

/// Whether every character of a piece is CJK, Chinese punctuation or ASCII punctuation
/// (true for the empty piece, as Python's `all([])`).
fn is_chinese_piece(piece: &str) -> bool {
    piece
        .chars()
        .all(|c| is_chinese_char(c) || is_chinese_punctuation(c) || c.is_ascii_punctuation())
}

/// Splits on single spaces and glues runs of Chinese pieces together; other pieces stay
/// space-separated. `"今 天 是 palm 的 日 子"` becomes `"今天是 palm 的日子"`.
pub fn remove_space_between_chinese_chars(decoded: &str) -> String {
    let words: Vec<&str> = decoded.split(' ').collect();
    let mut out: Vec<String> = Vec::with_capacity(words.len());
    let mut start: Option<usize> = None;
    for (i, w) in words.iter().enumerate() {
        if is_chinese_piece(w) {
            start.get_or_insert(i);
        } else {
            if let Some(s) = start.take() {
                out.push(words[s..i].concat());
            }
            out.push((*w).to_owned());
        }
    }
    if let Some(s) = start {
        out.push(words[s..].concat());
    }
    py_strip(&out.join(" ")).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuild_splits_chinese_and_keeps_latin_words() {
        assert_eq!(
            rebuild_chinese_str("PALM模型，2020年  in\tEMNLP."),
            "PALM 模 型 ， 2020 年 in EMNLP."
        );
    }

    #[test]
    fn despacing_glues_chinese_runs_only() {
        assert_eq!(
            remove_space_between_chinese_chars("今 天 是 palm 的 日 子 ！"),
            "今天是 palm 的日子！"
        );
        // ASCII punctuation alone is a "Chinese" piece, but a run of one is left as it is.
        assert_eq!(remove_space_between_chinese_chars("a , b"), "a , b");
        assert_eq!(remove_space_between_chinese_chars("好 , 的"), "好,的");
        assert_eq!(remove_space_between_chinese_chars(""), "");
    }

    #[test]
    fn ideographic_space_is_dropped() {
        assert_eq!(rebuild_chinese_str("你\u{3000}好"), "你 好");
    }

    #[test]
    fn python_whitespace_includes_separators() {
        assert_eq!(py_split("a\u{1f}b  c").collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(py_strip("\u{1c} x \n"), "x");
    }
}

//! ModelScope's `remove_space_between_chinese_chars` (`modelscope/utils/chinese_utils.py`).

/// Chinese punctuation as ModelScope lists it.
const CHINESE_PUNCTUATION: &str = "＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､\u{3000}、〃〈〉《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏﹑﹔·！？｡。";

fn is_chinese_char(c: char) -> bool {
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

/// Whether every character of a piece is CJK, Chinese punctuation or ASCII punctuation
/// (true for the empty piece, as Python's `all([])`).
fn is_chinese_piece(piece: &str) -> bool {
    piece
        .chars()
        .all(|c| is_chinese_char(c) || CHINESE_PUNCTUATION.contains(c) || c.is_ascii_punctuation())
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
    // Python's `str.strip()`.
    out.join(" ")
        .trim_matches(|c: char| c.is_whitespace() || matches!(c, '\u{1c}'..='\u{1f}'))
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glues_chinese_runs_only() {
        assert_eq!(
            remove_space_between_chinese_chars("今 天 是 palm 的 日 子 ！"),
            "今天是 palm 的日子！"
        );
        // ASCII punctuation alone is a "Chinese" piece, but a run of one is left as it is.
        assert_eq!(remove_space_between_chinese_chars("a , b"), "a , b");
        assert_eq!(remove_space_between_chinese_chars("好 , 的"), "好,的");
        assert_eq!(remove_space_between_chinese_chars(""), "");
    }
}

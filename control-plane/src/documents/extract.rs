//! Text extraction (Markdown, plain text, PDF) and chunking.
//!
//! Invariants:
//! - Chunking is deterministic: the same text and limits always give the same chunks, so
//!   chunk ids derived from (document id, ordinal) are stable.
//! - `char_start`/`char_end` are offsets in characters (not bytes) into the extracted text,
//!   `page` is the 1-based PDF page on which a chunk starts (`None` for text documents).
//! - Chunks follow paragraph boundaries and never span two sections or two pages; a paragraph longer than the limit is cut at the last
//!   sentence end or space before it. No chunk is empty or longer than `max_chars` characters.
//! - PDF parsing runs untrusted input through a third-party parser: a panic in it is caught
//!   and reported as an unreadable PDF, never a crashed worker.

/// What a document is, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaType {
    Markdown,
    Plain,
    Pdf,
}

impl MediaType {
    /// From a `Content-Type` value (parameters such as `charset` are ignored).
    pub fn parse(content_type: &str) -> Option<Self> {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "text/markdown" | "text/x-markdown" => Some(Self::Markdown),
            "text/plain" => Some(Self::Plain),
            "application/pdf" => Some(Self::Pdf),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Markdown => "text/markdown",
            Self::Plain => "text/plain",
            Self::Pdf => "application/pdf",
        }
    }
}

/// Why a document's text could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("the document is not valid UTF-8 text (byte {0})")]
    NotUtf8(usize),
    #[error("the PDF cannot be read: {0}")]
    Pdf(String),
    #[error("the document contains no text")]
    Empty,
    #[error(
        "the document has more than {0} chunks; split it or raise documents.max_chunks_per_document"
    )]
    TooManyChunks(usize),
}

/// Extracted text, page by page (one page for text documents).
#[derive(Debug, Clone)]
pub struct Extracted {
    pub pages: Vec<String>,
    /// Whether pages are real PDF pages (positions then carry page numbers).
    pub paged: bool,
}

/// Extracts the text of a document.
pub fn extract(media: MediaType, bytes: &[u8]) -> Result<Extracted, ExtractError> {
    match media {
        MediaType::Markdown | MediaType::Plain => {
            let text =
                std::str::from_utf8(bytes).map_err(|e| ExtractError::NotUtf8(e.valid_up_to()))?;
            Ok(Extracted {
                pages: vec![text.replace("\r\n", "\n")],
                paged: false,
            })
        }
        MediaType::Pdf => {
            let owned = bytes.to_vec();
            let pages = std::panic::catch_unwind(move || {
                pdf_extract::extract_text_from_mem_by_pages(&owned)
            })
            .map_err(|_| ExtractError::Pdf("the PDF parser gave up on this file".into()))?
            .map_err(|e| ExtractError::Pdf(e.to_string()))?;
            Ok(Extracted { pages, paged: true })
        }
    }
}

/// One chunk of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub ordinal: usize,
    pub char_start: usize,
    pub char_end: usize,
    pub page: Option<usize>,
    /// The nearest Markdown heading above the chunk.
    pub heading: Option<String>,
    pub content: String,
}

/// A paragraph: text plus its character span.
struct Para {
    start: usize,
    text: String,
    heading: Option<String>,
}

/// Splits extracted text into chunks of at most `max_chars` characters.
pub fn chunk(
    doc: &Extracted,
    markdown: bool,
    max_chars: usize,
    max_chunks: usize,
) -> Result<Vec<Chunk>, ExtractError> {
    let max_chars = max_chars.max(64);
    // Paragraphs with their character offsets into the concatenated text (pages joined by
    // "\n\n", counted like that in the offsets).
    let mut paras: Vec<Para> = Vec::new();
    let mut page_starts: Vec<usize> = Vec::new();
    let mut offset = 0usize;
    let mut heading: Option<String> = None;
    for page in &doc.pages {
        page_starts.push(offset);
        let mut cur: Option<Para> = None;
        let mut pos = offset;
        for line in page.split('\n') {
            let len = line.chars().count();
            let trimmed = line.trim();
            let is_heading = markdown && trimmed.starts_with('#');
            if (trimmed.is_empty() || is_heading)
                && let Some(p) = cur.take()
            {
                paras.push(p);
            }
            if is_heading {
                let h = trimmed.trim_start_matches('#').trim();
                if !h.is_empty() {
                    heading = Some(h.chars().take(200).collect());
                }
            } else if !trimmed.is_empty() {
                match &mut cur {
                    Some(p) => {
                        p.text.push('\n');
                        p.text.push_str(line);
                    }
                    None => {
                        cur = Some(Para {
                            start: pos,
                            text: line.to_owned(),
                            heading: heading.clone(),
                        });
                    }
                }
            }
            pos += len + 1;
        }
        if let Some(p) = cur.take() {
            paras.push(p);
        }
        offset += page.chars().count() + 2;
    }
    let page_of = |start: usize| {
        doc.paged.then(|| {
            page_starts
                .iter()
                .rposition(|&s| s <= start)
                .map_or(1, |i| i + 1)
        })
    };
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut open: Option<(usize, String, Option<String>, usize)> = None; // start, text, heading, end
    let mut emit = |start: usize,
                    text: String,
                    heading: Option<String>,
                    end: usize|
     -> Result<(), ExtractError> {
        let content = text.trim().to_owned();
        if content.is_empty() {
            return Ok(());
        }
        if chunks.len() >= max_chunks {
            return Err(ExtractError::TooManyChunks(max_chunks));
        }
        chunks.push(Chunk {
            ordinal: chunks.len(),
            char_start: start,
            char_end: end,
            page: page_of(start),
            heading,
            content,
        });
        Ok(())
    };
    for p in paras {
        let plen = p.text.chars().count();
        // A heading or page change starts a new chunk: a chunk belongs to one section and
        // one page, so its citation is exact.
        if let Some((s, t, h, e)) = open.take() {
            if h == p.heading
                && page_of(s) == page_of(p.start)
                && t.chars().count() + 2 + plen <= max_chars
            {
                open = Some((s, format!("{t}\n\n{}", p.text), h, p.start + plen));
                continue;
            }
            emit(s, t, h, e)?;
        }
        if plen <= max_chars {
            open = Some((p.start, p.text, p.heading, p.start + plen));
            continue;
        }
        // A long paragraph: cut at sentence ends (else spaces, else hard) below the limit.
        let chars: Vec<char> = p.text.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let hard = (i + max_chars).min(chars.len());
            let mut cut = hard;
            if hard < chars.len() {
                let window = &chars[i..hard];
                let sentence = window
                    .iter()
                    .enumerate()
                    .rev()
                    .find(|(j, c)| {
                        matches!(c, '.' | '!' | '?' | ';')
                            && window.get(j + 1).is_some_and(|n| n.is_whitespace())
                            && *j > max_chars / 2
                    })
                    .map(|(j, _)| i + j + 1);
                let space = window
                    .iter()
                    .rposition(|c| c.is_whitespace())
                    .filter(|&j| j > max_chars / 2)
                    .map(|j| i + j);
                cut = sentence.or(space).unwrap_or(hard);
            }
            let piece: String = chars[i..cut].iter().collect();
            emit(p.start + i, piece, p.heading.clone(), p.start + cut)?;
            i = cut;
            while i < chars.len() && chars[i].is_whitespace() {
                i += 1;
            }
        }
    }
    if let Some((s, t, h, e)) = open.take() {
        emit(s, t, h, e)?;
    }
    if chunks.is_empty() {
        return Err(ExtractError::Empty);
    }
    Ok(chunks)
}

/// The full-text configuration of a text: `german` or `english` by counting common function
/// words, `simple` when neither shows up.
pub fn detect_language(text: &str) -> &'static str {
    const DE: &[&str] = &[
        "der", "die", "das", "und", "ist", "nicht", "mit", "den", "ein", "eine", "zu", "bei",
        "auf", "für", "wird", "sind", "von", "im", "dem", "des", "oder", "wenn",
    ];
    const EN: &[&str] = &[
        "the", "and", "is", "of", "to", "with", "for", "on", "be", "are", "if", "this", "that",
        "it", "from", "or", "when", "not",
    ];
    let (mut de, mut en) = (0usize, 0usize);
    for w in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(5_000)
    {
        let w = w.to_lowercase();
        de += usize::from(DE.contains(&w.as_str()));
        en += usize::from(EN.contains(&w.as_str()));
    }
    if de == 0 && en == 0 {
        "simple"
    } else if de > en {
        "german"
    } else {
        "english"
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    fn text(s: &str) -> Extracted {
        Extracted {
            pages: vec![s.to_owned()],
            paged: false,
        }
    }

    #[test]
    fn chunks_follow_sections_and_positions_point_into_the_text() {
        let md = "# Spindle\n\nCheck the coolant.\n\nReplace the filter.\n\n# Hydraulics\n\nBleed the pump.";
        let chunks = chunk(&text(md), true, 500, 100).unwrap();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].heading.as_deref(), Some("Spindle"));
        assert_eq!(
            chunks[0].content,
            "Check the coolant.\n\nReplace the filter."
        );
        assert_eq!(chunks[1].heading.as_deref(), Some("Hydraulics"));
        let all: Vec<char> = md.chars().collect();
        for c in &chunks {
            let span: String = all[c.char_start..c.char_end].iter().collect();
            assert_eq!(span, c.content);
        }
        // Deterministic.
        assert_eq!(chunks, chunk(&text(md), true, 500, 100).unwrap());
    }

    #[test]
    fn long_paragraphs_are_cut_below_the_limit_and_pages_are_counted() {
        let long = "Die Spindel wird warm. ".repeat(40);
        let doc = Extracted {
            pages: vec!["Seite eins.".into(), long.clone()],
            paged: true,
        };
        let chunks = chunk(&doc, false, 120, 100).unwrap();
        assert!(chunks.len() > 5);
        assert!(chunks.iter().all(|c| c.content.chars().count() <= 120));
        assert_eq!(chunks[0].page, Some(1));
        assert_eq!(chunks[1].page, Some(2));
        assert!(chunks[1].content.ends_with('.'));
        assert!(matches!(
            chunk(&doc, false, 120, 3),
            Err(ExtractError::TooManyChunks(3))
        ));
        assert!(matches!(
            chunk(&text("  \n\n "), false, 100, 10),
            Err(ExtractError::Empty)
        ));
    }

    #[test]
    fn language_is_detected_from_function_words() {
        assert_eq!(
            detect_language("Die Spindel ist warm und der Filter wird getauscht"),
            "german"
        );
        assert_eq!(
            detect_language("The spindle is warm and the filter is replaced"),
            "english"
        );
        assert_eq!(detect_language("XK-200 4711"), "simple");
    }

    #[test]
    fn garbage_is_not_a_pdf() {
        assert!(matches!(
            extract(MediaType::Pdf, b"%PDF-1.4 nonsense"),
            Err(ExtractError::Pdf(_))
        ));
        assert!(matches!(
            extract(MediaType::Plain, &[0xff, 0xfe, 0x00]),
            Err(ExtractError::NotUtf8(0))
        ));
    }
}

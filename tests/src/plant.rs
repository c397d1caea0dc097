//! A small plant for tests of documents, grounded answers and the orchestrator: a German PDF
//! manual and an English Markdown procedure about an overheating spindle, a device with
//! rising spindle-temperature readings of press 1 and a prediction, and the question that
//! needs both. One copy for the control plane's tests and the end-to-end tests.

use sqlx::PgPool;
use uuid::Uuid;

/// A PDF with one text page per entry (Helvetica, WinAnsiEncoding, so German umlauts work).
pub fn pdf(pages: &[&[&str]]) -> Vec<u8> {
    let latin1 = |s: &str| -> Vec<u8> {
        s.chars()
            .flat_map(|c| match c {
                '(' | ')' | '\\' => vec![b'\\', c as u8],
                c if (c as u32) < 256 => vec![c as u8],
                _ => vec![b'?'],
            })
            .collect()
    };
    let n = pages.len();
    // Objects: 1 catalog, 2 pages, 3 font, then per page: page object, content stream.
    let mut objs: Vec<Vec<u8>> = vec![
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        format!(
            "<< /Type /Pages /Kids [{}] /Count {n} >>",
            (0..n)
                .map(|i| format!("{} 0 R", 4 + 2 * i))
                .collect::<Vec<_>>()
                .join(" ")
        )
        .into_bytes(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
            .to_vec(),
    ];
    for (i, lines) in pages.iter().enumerate() {
        objs.push(
            format!(
                "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] \
                 /Resources << /Font << /F1 3 0 R >> >> /Contents {} 0 R >>",
                5 + 2 * i
            )
            .into_bytes(),
        );
        let mut content = b"BT /F1 11 Tf 14 TL 50 800 Td\n".to_vec();
        for l in *lines {
            content.push(b'(');
            content.extend(latin1(l));
            content.extend(b") Tj T*\n");
        }
        content.extend(b"ET");
        let mut stream = format!("<< /Length {} >>\nstream\n", content.len()).into_bytes();
        stream.extend(content);
        stream.extend(b"\nendstream");
        objs.push(stream);
    }
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, o) in objs.iter().enumerate() {
        offsets.push(out.len());
        out.extend(format!("{} 0 obj\n", i + 1).into_bytes());
        out.extend(o);
        out.extend(b"\nendobj\n");
    }
    let xref = out.len();
    out.extend(format!("xref\n0 {}\n0000000000 65535 f \n", objs.len() + 1).into_bytes());
    for o in offsets {
        out.extend(format!("{o:010} 00000 n \n").into_bytes());
    }
    out.extend(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objs.len() + 1
        )
        .into_bytes(),
    );
    out
}

pub fn german_manual() -> Vec<u8> {
    pdf(&[
        &[
            "Betriebsanleitung Hydraulikpresse P1",
            "Sicherheitshinweise: Vor allen Wartungsarbeiten die Anlage abschalten",
            "und gegen Wiedereinschalten sichern.",
        ],
        &[
            "Spindeltemperatur zu hoch",
            "Steigt die Temperatur der Spindel über 80 °C, ist meist der Kühlmittelfluss",
            "zu gering. Kühlmittelfluss prüfen und den Kühlmittelfilter reinigen.",
            "Bei weiterem Anstieg die Spindellager schmieren.",
        ],
    ])
}

pub const PROCEDURE_MD: &str = "# Spindle overheating procedure\n\n\
## Symptoms\n\nThe spindle temperature of a press rises above 80 °C while the load is normal.\n\n\
## Actions\n\n1. Check the coolant flow at the spindle.\n2. Replace the coolant filter if it is clogged.\n\
3. If the temperature keeps rising, stop the press and inspect the spindle bearings.\n\n\
## Hydraulic oil\n\nChange the hydraulic oil every 2000 operating hours.\n";

pub const QUESTION: &str =
    "Why is spindle temperature on press 1 rising and what does the manual say to do?";

/// A device of `org` with readings of press-1's spindle temperature (rising over the last
/// half hour) and of press-2's oil pressure, and one prediction for press-1.
pub async fn plant_data(pool: &PgPool, org: Uuid) {
    let device = Uuid::new_v4();
    sqlx::query("INSERT INTO devices (id, org_id, name) VALUES ($1, $2, 'press-gw')")
        .bind(device)
        .bind(org)
        .execute(pool)
        .await
        .unwrap();
    for (seq, (machine, metric, mins_ago, value)) in [
        ("press-1", "spindle_temp", 30, 70.5),
        ("press-1", "spindle_temp", 15, 75.0),
        ("press-1", "spindle_temp", 0, 81.5),
        ("press-2", "oil_pressure", 0, 180.0),
    ]
    .into_iter()
    .enumerate()
    {
        sqlx::query(
            "INSERT INTO sensor_data (org_id, device_id, epoch, seq, machine, metric, ts, value) \
             VALUES ($1, $2, 1, $3, $4, $5, now() - make_interval(mins => $6), $7)",
        )
        .bind(org)
        .bind(device)
        .bind(seq as i64)
        .bind(machine)
        .bind(metric)
        .bind(mins_ago)
        .bind(value)
        .execute(pool)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO predictions (org_id, device_id, epoch, seq, machine, model_version, ts, \
         rul_cycles, anomaly_score) VALUES ($1, $2, 1, 100, 'press-1', 'rul@3', now(), 42.0, 0.9)",
    )
    .bind(org)
    .bind(device)
    .execute(pool)
    .await
    .unwrap();
}

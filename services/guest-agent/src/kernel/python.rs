//! The Python kernel's side of the driver protocol (see `driver.py`, which is embedded in
//! the binary and run with `python3 -c`): JSON lines both ways, binary values as hex.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;

use super::run::{Done, DriverEvent};
use super::{Event, ExecuteRequest};

const DRIVER: &str = include_str!("driver.py");

pub fn args() -> Vec<String> {
    // -u: unbuffered binary stdio layer (the driver also makes the text layer write-through).
    vec!["-u".into(), "-c".into(), DRIVER.into()]
}

pub fn exec_request(req: &ExecuteRequest) -> Vec<u8> {
    let msg = serde_json::json!({
        "op": "exec",
        "code": req.code,
        "env": req.env,
        "cwd": req.cwd.as_deref().unwrap_or(""),
    });
    line(msg)
}

pub fn env_request(env: &BTreeMap<String, String>) -> Vec<u8> {
    line(serde_json::json!({ "op": "env", "env": env }))
}

fn line(msg: serde_json::Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(&msg).expect("a JSON value always serializes");
    out.push(b'\n');
    out
}

#[derive(Deserialize)]
#[serde(tag = "ev", rename_all = "lowercase")]
enum Wire {
    Result {
        data: HashMap<String, String>,
    },
    Display {
        data: HashMap<String, String>,
    },
    Error {
        name: String,
        value: String,
        traceback: Vec<String>,
    },
    Done {
        ok: bool,
        exit_code: i32,
        cpu_ns: u64,
        interp_ns: u64,
    },
}

pub fn parse_event(line: &[u8]) -> Result<DriverEvent, String> {
    let wire: Wire = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    Ok(match wire {
        Wire::Result { data } => DriverEvent::Emit(Event::Result(unhex(data)?)),
        Wire::Display { data } => DriverEvent::Emit(Event::Display(unhex(data)?)),
        Wire::Error {
            name,
            value,
            traceback,
        } => DriverEvent::Emit(Event::Error {
            name,
            value,
            traceback,
        }),
        Wire::Done {
            ok,
            exit_code,
            cpu_ns,
            interp_ns,
        } => DriverEvent::Done(Done {
            ok,
            exit_code,
            cpu: Some(Duration::from_nanos(cpu_ns)),
            interpreter: Duration::from_nanos(interp_ns),
        }),
    })
}

fn unhex(data: HashMap<String, String>) -> Result<HashMap<String, Bytes>, String> {
    data.into_iter()
        .map(|(mime, hex)| {
            let bytes = hex::decode(&hex).map_err(|e| format!("{mime}: {e}"))?;
            Ok((mime, Bytes::from(bytes)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse() {
        let DriverEvent::Emit(Event::Result(data)) =
            parse_event(br#"{"ev":"result","data":{"text/plain":"3432"}}"#).unwrap()
        else {
            panic!("not a result")
        };
        assert_eq!(data["text/plain"], Bytes::from_static(b"42"));
        let DriverEvent::Done(d) =
            parse_event(br#"{"ev":"done","ok":false,"exit_code":1,"cpu_ns":5,"interp_ns":7}"#)
                .unwrap()
        else {
            panic!("not done")
        };
        assert!(!d.ok);
        assert_eq!(d.interpreter, Duration::from_nanos(7));
        assert!(parse_event(b"{\"ev\":\"bogus\"}").is_err());
        assert!(parse_event(br#"{"ev":"display","data":{"image/png":"zz"}}"#).is_err());
    }

    #[test]
    fn requests_are_one_line() {
        let req = ExecuteRequest {
            language: super::super::Language::Python,
            code: "a\nb".into(),
            timeout: Duration::from_secs(1),
            env: BTreeMap::new(),
            cwd: None,
            max_output_bytes: 1,
        };
        let line = exec_request(&req);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert!(line.ends_with(b"\n"));
    }
}

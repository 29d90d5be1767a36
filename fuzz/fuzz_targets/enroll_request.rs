//! Any bytes on the enrollment socket: the bounded line reader splits them into lines no
//! longer than its bound, and each line goes through the request parser. Nothing may panic;
//! a request that parses must survive a round trip through its JSON form.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use palisade_ztunnel::enroll::{LineError, parse_request, read_line};
use tokio::io::BufReader;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose the line bound and the reader's chunk size, so lines that
    // cross chunk boundaries and the bound itself are both explored.
    let (max, chunk, input) = match data {
        [a, b, rest @ ..] => (usize::from(*a) * 4, usize::from(*b).max(1), rest),
        _ => return,
    };
    runtime().block_on(async {
        let mut reader = BufReader::with_capacity(chunk, input);
        let mut line = Vec::new();
        let mut consumed = 0;
        loop {
            match read_line(&mut reader, max, &mut line).await {
                Ok(true) => {
                    assert!(line.len() <= max, "a line of {} bytes passed the bound {max}", line.len());
                    assert!(!line.contains(&b'\n'), "a line kept its newline");
                    // The line is the input's next bytes (its `\r\n` or `\n` dropped).
                    assert!(input[consumed..].starts_with(&line), "the line is not the input's next bytes");
                    consumed += line.len();
                    consumed += usize::from(input.get(consumed) == Some(&b'\r'));
                    consumed += usize::from(input.get(consumed) == Some(&b'\n'));
                    if let Ok(request) = parse_request(&line) {
                        let again = serde_json::to_vec(&request).expect("a request serializes");
                        assert!(parse_request(&again).is_ok(), "{request:?} does not parse back");
                    }
                }
                Ok(false) => {
                    assert_eq!(consumed, input.len(), "the reader stopped before the end");
                    return;
                }
                Err(LineError::TooLong { .. }) => return,
                Err(e) => panic!("reading from memory failed: {e}"),
            }
        }
    });
});

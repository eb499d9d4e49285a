//! Bytes as a policy file: the parser must refuse or accept without panicking, and an accepted
//! policy must compile to tables that agree with the reference model.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod agree;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(policy) =
        keepalive_agent::policy::file::parse(std::path::Path::new("fuzz.toml"), text)
    {
        agree::check(&policy);
    }
});

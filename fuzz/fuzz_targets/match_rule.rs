#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| busvisor::fuzzing::match_rule(data));

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| busvisor::fuzzing::toml_files(data));

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| busvisor::fuzzing::service_file(data));

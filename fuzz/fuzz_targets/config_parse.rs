//! `Config::from_toml_str` (TOML parsing, normalisation and validation) on arbitrary text.
//! Besides never panicking: a config that loads prints (as `emars check-config` does) to TOML
//! that loads back to the same config.
#![no_main]

use emars_agent::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_toml_str(text) else {
        return;
    };
    let printed = toml::to_string_pretty(&config).expect("an accepted config prints as TOML");
    match Config::from_toml_str(&printed) {
        Ok(again) => assert_eq!(again, config, "printed as:\n{printed}"),
        Err(e) => panic!("the printed config does not load: {e}\n{printed}"),
    }
});

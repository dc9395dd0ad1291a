//! `cascade keys new`: a fresh API key and the hash the config stores.

use rand::RngCore;

use crate::cli::KeysCommand;

/// Runs a keys subcommand.
pub fn run(command: &KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::New => {
            let mut bytes = [0u8; 32];
            rand::rng().fill_bytes(&mut bytes);
            let key = policies::team::generate_api_key(bytes);
            let hash = policies::team::hash_api_key(&key);
            println!("key:    {key}");
            println!("hash:   {hash}");
            println!("key id: {}", policies::team::key_id(&hash));
            println!();
            println!("The key is shown only now. Give it to the team and add the hash to");
            println!("its `api_key_hashes` in the config; Cascade never stores the key itself.");
            Ok(())
        }
    }
}

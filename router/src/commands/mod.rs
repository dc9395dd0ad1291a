//! One module per subcommand.

pub mod bench;
pub mod calibrate;
pub mod eval;
pub mod generate;
pub mod keys;
pub mod report;
pub mod serve;

use local_model::{LoadOptions, LocalModel};

use crate::cli::ModelArgs;

/// Loads the model named on the command line.
pub fn load_model(args: &ModelArgs) -> anyhow::Result<LocalModel> {
    let options = LoadOptions {
        dtype: args.dtype.parse()?,
        template: args.template.parse()?,
        kernels: args.kernels.parse()?,
        prefill_weights: args.prefill_weights.parse()?,
        ..LoadOptions::default()
    };
    Ok(LocalModel::load(&args.model, &options)?)
}

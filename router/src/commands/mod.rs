//! One module per subcommand.

pub mod bench;
pub mod calibrate;
pub mod eval;
pub mod generate;
pub mod keys;
pub mod report;
pub mod serve;

use local_model::LocalModel;

use crate::cli::ModelArgs;

/// Loads the model named on the command line.
pub fn load_model(args: &ModelArgs) -> anyhow::Result<LocalModel> {
    Ok(LocalModel::load(&args.model, &args.load.options()?)?)
}

//! One module per subcommand.

pub mod check;
pub mod detach;
pub mod generate;
pub mod run;
pub mod status;

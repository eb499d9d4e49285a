//! One module per subcommand.

pub mod check;
pub mod detach;
pub mod engines;
pub mod explain;
pub mod generate;
pub mod report;
pub mod run;
pub mod scan;
pub mod source;
pub mod status;

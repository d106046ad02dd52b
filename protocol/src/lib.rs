pub mod duration;
pub mod executor;
pub mod segment;

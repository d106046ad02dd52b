//! Plan compilation: everything between a plan's text and what a VU runs. A bundle's
//! files are read and confined here, templates, JSON paths and data feeders are built
//! once, so that nothing is parsed per request. Nothing here sends traffic or knows
//! about the mesh.

pub mod bundle;
pub mod compile;
pub mod data;
pub mod har;
pub mod jsonpath;
pub mod template;

pub mod mesh;
pub fn placeholder() {}

pub fn main(_args: &[String]) -> Result<(), String> {
    Err("mtree: not yet".into())
}

use lbaas_ctl::datapath::{Datapath, LoadOptions};
use aya::programs::{TestRun, TestRunOptions};

#[test]
fn loads() {
    let dp = Datapath::load(LoadOptions::default()).expect("load");
    let frame = [0u8; 64];
    let mut out = [0u8; 128];
    let r = dp.program().unwrap().test_run(TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..Default::default() }).unwrap();
    println!("{r:?}");
}

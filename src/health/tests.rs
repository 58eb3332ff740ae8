use super::*;

/// (start up?, probe results, rise, fall, expected transitions, final state)
type Case<'a> = (bool, &'a [bool], u32, u32, &'a [Option<Transition>], bool);

#[test]
fn rise_and_fall_table() {
    let cases: &[Case] = &[
        (
            true,
            &[false, false, false],
            2,
            3,
            &[None, None, Some(Transition::Down)],
            false,
        ),
        (
            true,
            &[false, false, true, false, false],
            2,
            3,
            &[None, None, None, None, None],
            true,
        ),
        (
            false,
            &[true, true],
            2,
            3,
            &[None, Some(Transition::Up)],
            true,
        ),
        (
            false,
            &[true, false, true],
            2,
            3,
            &[None, None, None],
            false,
        ),
        (true, &[false], 1, 1, &[Some(Transition::Down)], false),
        (true, &[true, true, true], 2, 3, &[None, None, None], true),
    ];
    for (i, (start, probes, rise, fall, want, end)) in cases.iter().enumerate() {
        let mut c = Counter::new(*start);
        let got: Vec<_> = probes
            .iter()
            .map(|&ok| c.record(ok, *rise, *fall))
            .collect();
        assert_eq!(&got, want, "case {i}");
        assert_eq!(c.is_up(), *end, "case {i}");
    }
}

//! Pure shard balance of SPEC §5: each instance's fair share and how many shards to hand over.

/// What one instance reported about itself in its last heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    pub instance: String,
    pub owned: usize,
}

/// The fair share of `me` among `members` (every live instance, `me` included): ⌊S/N⌋ shards,
/// plus one for the first S mod N instances in id order, so the shares add up to S and every
/// instance computes the same ones from the same membership.
pub fn fair_share(shards: usize, members: &[&str], me: &str) -> usize {
    let mut sorted: Vec<&str> = members.to_vec();
    if !sorted.contains(&me) {
        sorted.push(me);
    }
    sorted.sort_unstable();
    sorted.dedup();
    let count = sorted.len();
    let rank = sorted
        .iter()
        .position(|member| *member == me)
        .expect("me was added to the members above");
    shards / count + usize::from(rank < shards % count)
}

/// How many of its `owned` shards `me` should hand over now: what it holds above its fair share,
/// but no more than the other members lack below theirs (a shard handed over with nobody short
/// of shards would only come back).
pub fn shards_to_hand_over(shards: usize, me: &str, owned: usize, others: &[MemberView]) -> usize {
    let mut members: Vec<&str> = others.iter().map(|m| m.instance.as_str()).collect();
    members.push(me);
    let excess = owned.saturating_sub(fair_share(shards, &members, me));
    let shortfall: usize = others
        .iter()
        .map(|member| fair_share(shards, &members, &member.instance).saturating_sub(member.owned))
        .sum();
    excess.min(shortfall)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn view(instance: &str, owned: usize) -> MemberView {
        MemberView {
            instance: instance.into(),
            owned,
        }
    }

    #[test]
    fn shares_of_sixteen_over_three_are_six_five_five() {
        let members = ["b", "a", "c"];
        let shares: Vec<usize> = ["a", "b", "c"]
            .iter()
            .map(|me| fair_share(16, &members, me))
            .collect();
        assert_eq!(shares, vec![6, 5, 5]);
    }

    #[test]
    fn a_lone_instance_keeps_everything() {
        assert_eq!(fair_share(16, &[], "a"), 16);
        assert_eq!(shards_to_hand_over(16, "a", 16, &[]), 0);
    }

    #[test]
    fn the_first_instance_hands_over_to_a_newcomer() {
        assert_eq!(shards_to_hand_over(16, "a", 16, &[view("b", 0)]), 8);
        // Already balanced: nothing moves.
        assert_eq!(shards_to_hand_over(16, "a", 8, &[view("b", 8)]), 0);
    }

    #[test]
    fn no_hand_over_when_nobody_is_short() {
        // "b" holds shards of a dead instance that has not expired yet: "a" keeps its own.
        assert_eq!(shards_to_hand_over(16, "a", 8, &[view("b", 8)]), 0);
        assert_eq!(
            shards_to_hand_over(16, "a", 7, &[view("b", 5), view("c", 4)]),
            1
        );
    }

    proptest! {
        #[test]
        fn shares_add_up_and_differ_by_at_most_one(shards in 1usize..64, count in 1usize..10) {
            let names: Vec<String> = (0..count).map(|i| format!("instance-{i:02}")).collect();
            let members: Vec<&str> = names.iter().map(String::as_str).collect();
            let shares: Vec<usize> = members.iter().map(|me| fair_share(shards, &members, me)).collect();
            prop_assert_eq!(shares.iter().sum::<usize>(), shards);
            prop_assert!(shares.iter().all(|share| *share == shards / count || *share == shards.div_ceil(count)));
        }

        #[test]
        fn handing_over_never_leaves_anyone_below_their_share(
            shards in 1usize..40,
            split in proptest::collection::vec(0usize..40, 1..6),
        ) {
            // Shards spread over instances arbitrarily (summing to at most `shards`).
            let mut left = shards;
            let owned: Vec<usize> = split.iter().map(|want| { let take = (*want).min(left); left -= take; take }).collect();
            let names: Vec<String> = (0..owned.len()).map(|i| format!("i{i}")).collect();
            for (index, me) in names.iter().enumerate() {
                let others: Vec<MemberView> = names.iter().zip(&owned).enumerate()
                    .filter(|(other, _)| *other != index)
                    .map(|(_, (name, count))| view(name, *count))
                    .collect();
                let members: Vec<&str> = names.iter().map(String::as_str).collect();
                let hand_over = shards_to_hand_over(shards, me, owned[index], &others);
                prop_assert!(owned[index] - hand_over >= fair_share(shards, &members, me).min(owned[index]));
            }
        }
    }
}

//! Bounded label values declared once: [`tokens!`](crate::tokens!) makes an
//! enum from one table of variant and token, with every value listed
//! (`ALL`, in order, so a value's index is `value as usize`) and its
//! token. The code that names a value and the metrics that make its series
//! at 0 read the same list, so a value cannot be counted without a series,
//! nor a series listed that nothing counts.

/// Declares an enum of label values from one table of variant and token:
/// `COUNT`, `ALL` (every value, in the table's order), `token()` (the
/// label, on the wire or in a scrape) and `Display` as the token. Extra
/// attributes (docs, derives) go on the enum and on each variant.
#[macro_export]
macro_rules! tokens {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $token:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// How many values there are.
            pub const COUNT: usize = [$($token),+].len();
            /// Every value, in the order of the table; a value's index is
            /// `value as usize`.
            pub const ALL: [$name; Self::COUNT] = [$($name::$variant),+];

            /// The label token it is counted and logged under.
            pub const fn token(self) -> &'static str {
                match self {
                    $( $name::$variant => $token, )+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.token())
            }
        }
    };
}

#[cfg(test)]
mod tests {
    crate::tokens! {
        /// A test list.
        enum Colour {
            Red = "red",
            Dark = "dark_blue",
        }
    }

    #[test]
    fn every_value_is_listed_at_its_index_with_its_token() {
        assert_eq!(Colour::COUNT, 2);
        for (i, colour) in Colour::ALL.into_iter().enumerate() {
            assert_eq!(colour as usize, i);
        }
        assert_eq!(Colour::ALL.map(Colour::token), ["red", "dark_blue"]);
        assert_eq!(Colour::Dark.to_string(), "dark_blue");
    }
}

# Count lower-cased words of at least `min` letters; print "word count" lines.
{
    line = tolower($0)
    gsub(/[^a-z]+/, " ", line)
    n = split(line, words, " ")
    for (i = 1; i <= n; i++) if (length(words[i]) >= min) count[words[i]]++
}
END { for (w in count) print w, count[w] }
